"""API errors: each has its status and default message, and every body is `{"detail": ...}`."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state."
    default_code = "conflict"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "payload_too_large"


class UnprocessableEntity(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "The request is well-formed but could not be processed."
    default_code = "unprocessable"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Render API errors as `{"detail": ...}`, and log client errors as warnings."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    response = drf_exception_handler(exc, context)
    if response is not None:
        request = context.get("request")
        logger.warning(
            "%s %s -> %s: %s",
            getattr(request, "method", "?"),
            getattr(request, "path", "?"),
            response.status_code,
            response.data,
        )
    return response


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Return 404 for a URL that matches no route: JSON below /api/, Django's page elsewhere.

    A malformed id in a path, such as /api/models/not-a-uuid/, matches no route either.
    """
    if not request.path.startswith("/api/"):
        return defaults.page_not_found(request, exception)
    path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    logger.warning("%s %s -> 404: no such API route", request.method, path)
    return JsonResponse(
        {
            "detail": f"No API endpoint matches the path {path!r}. Check the path against "
            "/api/schema/; ids in paths are canonical UUIDs (group ids are integers)."
        },
        status=404,
    )
