"""Schema responses, lookups, upload checks and the download renderer of the model views."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any, cast

from django.core.files import File
from django.http import FileResponse, HttpResponseBase, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse
from rest_framework import renderers
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request

from fedserve import modelfiles, modelstore
from fedserve.core.models import FileFormat, Metric, Model, ModelKind, User

logger = logging.getLogger(__name__)

_UNAUTHENTICATED = OpenApiResponse(description="Missing or invalid credentials.")
_MODEL_NOT_FOUND = OpenApiResponse(description="No model has this id.")
_TOO_LARGE = OpenApiResponse(
    description="The upload is larger than FEDSERVE_MAX_UPLOAD_BYTES (the message names it)."
)
_UNSUPPORTED_MEDIA = OpenApiResponse(description="The body has an unsupported content type.")
_NOT_READER = OpenApiResponse(
    description="Only the model's owner, its training's actor and participants may."
)
_BINARY_FILE = OpenApiResponse(response=OpenApiTypes.BINARY, description="The stored file.")


class OctetStreamRenderer(renderers.BaseRenderer):
    """Lets clients send `Accept: application/octet-stream` to the download endpoints.

    Files are returned as FileResponse and bypass rendering; an error body is rendered as JSON.
    """

    media_type = "application/octet-stream"
    format = "bin"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Any = None,
    ) -> bytes:
        if isinstance(data, bytes):
            return data
        return renderers.JSONRenderer().render(data)


_DOWNLOAD_RENDERERS = [renderers.JSONRenderer, OctetStreamRenderer]


# Lookups and responses


def _user(request: Request) -> User:
    # Every view here requires authentication, so the user is never anonymous.
    return cast(User, request.user)


def _get_model(model_id: uuid.UUID | str) -> Model:
    model = Model.objects.select_related("base_model").filter(pk=model_id).first()
    if model is None:
        raise NotFound(f"Model {model_id} was not found.")
    return model


def _require_global(model: Model, action: str) -> None:
    if model.kind == ModelKind.LOCAL:
        raise ValidationError(
            {
                "detail": f"Model {model.pk} is a local model; {action} its global model "
                f"{model.base_model_id} instead."
            }
        )


def _file_response(path: str, filename: str) -> HttpResponseBase:
    """Stream a stored file to the client in chunks, with its length and a file name."""
    try:
        length = modelstore.size(path)
        if modelstore.is_local():
            response: HttpResponseBase = FileResponse(
                modelstore.open_file(path), content_type="application/octet-stream"
            )
            # The WSGI server sends a local file with sendfile; other reads use this size.
            response.block_size = modelstore.CHUNK_SIZE  # type: ignore[attr-defined]
        else:
            response = StreamingHttpResponse(
                modelstore.iter_chunks(path), content_type="application/octet-stream"
            )
    except FileNotFoundError:
        logger.error("stored file %s is missing from the model store", path)
        raise NotFound(f"The file {filename} is missing from the model store.") from None
    response["Content-Length"] = str(length)
    response["Content-Disposition"] = f'filename="{filename}"'
    return response


def _check_module_upload(field: str, upload: File[Any]) -> FileFormat:
    """Check that an uploaded file is a module this server can load; return its format."""
    try:
        fmt = modelfiles.check_module_file(upload)
    except modelfiles.ModelFileError as error:
        raise ValidationError({field: [str(error)]}) from None
    upload.seek(0)
    return fmt


def _store_new_files(files: Iterable[tuple[str, File[Any]]]) -> list[str]:
    """Save uploads into the model store; on failure delete those already saved."""
    stored: list[str] = []
    try:
        for path, content in files:
            stored.append(modelstore.save(path, content))
    except BaseException:
        modelstore.delete(stored)
        raise
    return stored


def _metric_rows(
    model: Model, metrics: list[tuple[str, tuple[float | None, str | None]]], step: int, user: Any
) -> list[Metric]:
    return [
        Metric(
            model=model,
            identifier=name,
            key=name,
            value_float=number,
            value_text=text,
            step=step,
            reporter=user,
        )
        for name, (number, text) in metrics
    ]


def _check_round(model: Model, round_number: int) -> None:
    if round_number != model.round:
        raise ValidationError(
            {
                "round": [
                    f"Model {model.pk} is in round {model.round}, not {round_number}; train on "
                    f"the current model and send round={model.round}."
                ]
            }
        )
