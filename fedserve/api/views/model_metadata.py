"""Model metadata and metrics endpoints."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from django.db import transaction
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.parsers import FormParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve import modelstats, modelstore, rounds
from fedserve.api import permissions
from fedserve.api.serializers.models import (
    MetricSerializer,
    MetricsUploadSerializer,
    ModelCreatedSerializer,
    ModelMetadataSerializer,
)
from fedserve.api.uploads import LimitedJSONParser, StreamingMultiPartParser
from fedserve.api.views.model_common import (
    _MODEL_NOT_FOUND,
    _NOT_READER,
    _TOO_LARGE,
    _UNAUTHENTICATED,
    _UNSUPPORTED_MEDIA,
    _get_model,
    _metric_rows,
    _user,
)
from fedserve.core.models import Metric, Model

logger = logging.getLogger(__name__)


class ModelMetadata(APIView):
    @extend_schema(
        operation_id="models_metadata_retrieve",
        summary="Model fields, preprocessing flag and statistics",
        description=(
            "stats lists parameter counts and sizes and, when the model has an input_shape, "
            "a layer summary from running it on a zero tensor of that shape (free dimensions "
            "set to 1) on PyTorch's meta device. stats is null when it cannot be computed."
        ),
        responses={
            200: ModelMetadataSerializer,
            401: _UNAUTHENTICATED,
            403: _NOT_READER,
            404: _MODEL_NOT_FOUND,
        },
    )
    def get(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_read_model(request.user, model)
        context = {"stats": _model_stats(model)}
        return Response(ModelMetadataSerializer(model, context=context).data)


def _model_stats(model: Model) -> dict[str, Any] | None:
    if not model.weights_path:
        return None
    try:
        with modelstore.open_file(model.weights_path) as handle:
            return modelstats.summarize(
                handle, model.weights_format, model.input_shape, model.weights_size
            )
    except OSError as error:
        logger.error("model %s: cannot read %s: %s", model.pk, model.weights_path, error)
        return None


class ModelMetrics(APIView):
    parser_classes = [LimitedJSONParser, FormParser, StreamingMultiPartParser]

    @extend_schema(
        operation_id="models_metrics_list",
        summary="Metrics reported for a model",
        responses={
            200: MetricSerializer(many=True),
            401: _UNAUTHENTICATED,
            403: _NOT_READER,
            404: _MODEL_NOT_FOUND,
        },
    )
    def get(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_read_model(request.user, model)
        metrics = Metric.objects.filter(model=model).order_by("id")
        return Response(MetricSerializer(metrics, many=True).data)

    @extend_schema(
        operation_id="models_metrics_create",
        summary="Report metrics for a model",
        description="Each metric is stored with step = the model's current round and "
        "reporter = you. A value that is not a finite float is stored as text.",
        request={
            "application/json": MetricsUploadSerializer,
            "multipart/form-data": MetricsUploadSerializer,
            "application/x-www-form-urlencoded": MetricsUploadSerializer,
        },
        responses={
            201: ModelCreatedSerializer,
            400: OpenApiResponse(description="Missing metrics, or lists of different lengths."),
            401: _UNAUTHENTICATED,
            403: _NOT_READER,
            404: _MODEL_NOT_FOUND,
            413: _TOO_LARGE,
            415: _UNSUPPORTED_MEDIA,
        },
        examples=[
            OpenApiExample(
                "Accuracy and loss",
                media_type="application/json",
                request_only=True,
                value={"metric_names": ["accuracy", "loss"], "metric_values": [0.91, 0.27]},
            )
        ],
    )
    def post(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_upload_metrics(request.user, model)
        serializer = MetricsUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)

        with transaction.atomic():
            rows = _metric_rows(
                model, serializer.validated_data["metrics"], model.round, request.user
            )
            Metric.objects.bulk_create(rows)
            transaction.on_commit(partial(rounds.metrics_uploaded, model, _user(request).pk))
        return Response(
            {"detail": "Model Metrics Upload Accepted", "model_id": str(model.pk)},
            status=status.HTTP_201_CREATED,
        )
