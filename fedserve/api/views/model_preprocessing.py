"""Preprocessing module endpoints: download or replace the module that inference applies
to inputs."""

from __future__ import annotations

import uuid
from functools import partial

from django.db import transaction
from django.http import HttpResponseBase
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve import modelstore
from fedserve.api import permissions
from fedserve.api.serializers.models import ModelMessageSerializer, PreprocessingUploadSerializer
from fedserve.api.uploads import StreamingMultiPartParser
from fedserve.api.views.model_common import (
    _BINARY_FILE,
    _DOWNLOAD_RENDERERS,
    _MODEL_NOT_FOUND,
    _NOT_READER,
    _TOO_LARGE,
    _UNAUTHENTICATED,
    _UNSUPPORTED_MEDIA,
    _check_module_upload,
    _file_response,
    _get_model,
    _require_global,
    _store_new_files,
)
from fedserve.core.models import Model, ModelKind


class ModelPreprocessing(APIView):
    parser_classes = [StreamingMultiPartParser]
    renderer_classes = _DOWNLOAD_RENDERERS

    @extend_schema(
        operation_id="models_preprocessing_download",
        summary="Download the preprocessing module",
        description="For a local model, the preprocessing module of its global model.",
        responses={
            (200, "application/octet-stream"): _BINARY_FILE,
            401: _UNAUTHENTICATED,
            403: _NOT_READER,
            404: OpenApiResponse(description="No model has this id, or it has no preprocessing."),
        },
    )
    def get(self, request: Request, id: str) -> HttpResponseBase:
        model = _get_model(id)
        permissions.require_read_model(request.user, model)
        target = model.base_model if model.kind == ModelKind.LOCAL else model
        if target is None or not target.preprocessing_path:
            raise NotFound(f"Model {model.pk} has no preprocessing module.")
        return _file_response(target.preprocessing_path, f"model-{model.pk}-preprocessing.pt")

    @extend_schema(
        operation_id="models_preprocessing_create",
        summary="Set the preprocessing module",
        description="A TorchScript module (or, where the server allows it, a pickled "
        "nn.Module) that inference applies to inputs; it replaces any earlier one.",
        request={"multipart/form-data": PreprocessingUploadSerializer},
        responses={
            202: ModelMessageSerializer,
            400: OpenApiResponse(
                description="A missing or invalid file (not a loadable module), or a local model."
            ),
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="Only the model's owner may."),
            404: _MODEL_NOT_FOUND,
            413: _TOO_LARGE,
            415: _UNSUPPORTED_MEDIA,
        },
    )
    def post(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_upload_preprocessing(request.user, model)
        _require_global(model, "set the preprocessing of")
        serializer = PreprocessingUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload = serializer.validated_data["model_preprocessing_file"]
        fmt = _check_module_upload("model_preprocessing_file", upload)

        # A new name per upload, so the old file stays valid until the row points elsewhere.
        name = f"preprocessing-{uuid.uuid4().hex[:12]}.pt"
        (stored,) = _store_new_files([(modelstore.model_file_path(model.pk, name), upload)])
        previous = model.preprocessing_path
        try:
            with transaction.atomic():
                Model.objects.filter(pk=model.pk).update(
                    preprocessing_path=stored, preprocessing_format=fmt
                )
                if previous:
                    transaction.on_commit(partial(modelstore.delete, [previous]), robust=True)
        except BaseException:
            modelstore.delete([stored])
            raise
        return Response(
            {"detail": "Preprocessing Model Upload Accepted", "model_id": str(model.pk)},
            status=status.HTTP_202_ACCEPTED,
        )
