"""Model endpoints: upload, list, download and delete global models, and list the models
of a training.

The streaming multipart parser spools uploaded files to disk. `fedserve.modelfiles` checks
them, and accepted files move into the model store, so a rejected request leaves no file.
The endpoints below models/<id>/ live in the `model_*` modules beside this one, and
ModelDetail takes its POST handler, the local update upload, from `model_updates`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.core.files import File
from django.db import transaction
from django.http import HttpResponseBase
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve import modelfiles, modelstore
from fedserve.api import permissions
from fedserve.api.serializers.models import (
    MeanModelUploadSerializer,
    ModelCreatedSerializer,
    ModelMessageSerializer,
    ModelSerializer,
    ModelUploadSerializer,
)
from fedserve.api.uploads import LimitedJSONParser, StreamingMultiPartParser
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
    _store_new_files,
    _user,
)
from fedserve.api.views.model_updates import LocalUpdateUploadMixin
from fedserve.core.models import FileFormat, Model, ModelKind, Training

logger = logging.getLogger(__name__)


def _check_finite_weights(upload: File[Any], fmt: FileFormat) -> None:
    """Reject a global model file whose state dict contains NaN or infinite values."""
    try:
        problem = modelfiles.find_non_finite(upload, fmt)
    except modelfiles.ModelFileError as error:
        raise ValidationError({"model_file": [str(error)]}) from None
    upload.seek(0)
    if problem:
        raise ValidationError(
            {"model_file": [f"The model's tensor {problem}; send finite weights."]}
        )


# Global models


class ModelListCreate(APIView):
    parser_classes = [StreamingMultiPartParser, LimitedJSONParser]

    @extend_schema(
        operation_id="models_list",
        summary="Global models related to you",
        description="Global models you own or whose training you act in or take part in, "
        "without weights.",
        responses={200: ModelSerializer(many=True), 401: _UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        models = (
            permissions.global_models_related_to(request.user)
            .prefetch_related("members")
            .order_by("created_at")
        )
        return Response(ModelSerializer(models, many=True).data)

    @extend_schema(
        operation_id="models_create",
        summary="Upload a global model",
        description=(
            "GLOBAL and SWAG models are multipart uploads with a TorchScript archive in "
            "model_file (or a pickled nn.Module, where the server allows it). A MEAN model is an "
            "ensemble of global models you own, sent as JSON or multipart with their ids in "
            "models, and has no file of its own."
        ),
        request={
            "multipart/form-data": ModelUploadSerializer,
            "application/json": MeanModelUploadSerializer,
        },
        responses={
            201: ModelCreatedSerializer,
            400: OpenApiResponse(
                description="Invalid fields, a file that is not a loadable module (the "
                "message names the accepted formats), or weights with NaN or infinite values."
            ),
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="A member of a MEAN model is not yours."),
            413: _TOO_LARGE,
            415: _UNSUPPORTED_MEDIA,
        },
        examples=[
            OpenApiExample(
                "MEAN model",
                media_type="application/json",
                request_only=True,
                value={
                    "name": "ensemble",
                    "description": "Mean of two models",
                    "type": "MEAN",
                    "models": [
                        "7d3b7b8e-2f6c-4f4e-9f0e-9d5e6c1a2b3c",
                        "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                    ],
                },
            )
        ],
    )
    def post(self, request: Request) -> Response:
        serializer = ModelUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = serializer.validated_data

        model = Model(
            owner=_user(request),
            kind=fields["type"],
            name=fields["name"],
            description=fields["description"],
            input_shape=fields.get("input_shape"),
        )
        members = _ensemble_members(request.user, fields.get("models") or [])
        uploads: dict[str, tuple[str, File[Any]]] = {}
        if fields.get("model_file") is not None:
            model.weights_format = _check_module_upload("model_file", fields["model_file"])
            _check_finite_weights(fields["model_file"], model.weights_format)
            path = modelstore.model_file_path(model.pk, "weights.pt")
            uploads["weights"] = (path, fields["model_file"])
        if fields.get("model_preprocessing_file") is not None:
            upload = fields["model_preprocessing_file"]
            model.preprocessing_format = _check_module_upload("model_preprocessing_file", upload)
            path = modelstore.model_file_path(model.pk, "preprocessing.pt")
            uploads["preprocessing"] = (path, upload)

        stored = dict(zip(uploads, _store_new_files(uploads.values()), strict=True))
        try:
            if "weights" in stored:
                model.weights_path = stored["weights"]
                model.weights_size = modelstore.size(stored["weights"])
            model.preprocessing_path = stored.get("preprocessing", "")
            with transaction.atomic():
                model.save()
                model.members.set(members)
        except BaseException:
            modelstore.delete(list(stored.values()))
            raise

        logger.info("model %s (%s) uploaded by %s", model.pk, model.kind, request.user.pk)
        return Response(
            {"detail": "Model Upload Accepted", "model_id": str(model.pk)},
            status=status.HTTP_201_CREATED,
        )


def _ensemble_members(user: Any, member_ids: list[uuid.UUID]) -> list[Model]:
    members = []
    for member_id in dict.fromkeys(member_ids):
        member = Model.objects.filter(pk=member_id).first()
        if member is None:
            raise ValidationError(
                {"models": [f"Model {member_id} was not found; list ids of your global models."]}
            )
        permissions.require_ensemble_member(user, member)
        if member.kind not in (ModelKind.GLOBAL, ModelKind.SWAG):
            raise ValidationError(
                {
                    "models": [
                        f"Model {member_id} is a {member.kind} model; a MEAN model combines "
                        "GLOBAL and SWAG models only."
                    ]
                }
            )
        members.append(member)
    return members


class ModelDetail(LocalUpdateUploadMixin, APIView):
    parser_classes = [StreamingMultiPartParser]
    renderer_classes = _DOWNLOAD_RENDERERS

    @extend_schema(
        operation_id="models_download",
        summary="Download a model file",
        responses={
            (200, "application/octet-stream"): _BINARY_FILE,
            401: _UNAUTHENTICATED,
            403: _NOT_READER,
            404: OpenApiResponse(description="No model has this id, or it is a MEAN model."),
        },
    )
    def get(self, request: Request, id: str) -> HttpResponseBase:
        model = _get_model(id)
        permissions.require_read_model(request.user, model)
        if not model.weights_path:
            raise NotFound(
                f"Model {model.pk} is a {model.kind} model without a file of its own; download "
                "its member models instead."
            )
        return _file_response(model.weights_path, f"model-{model.pk}.pt")

    @extend_schema(
        operation_id="models_destroy",
        summary="Delete a model",
        description="Deletes the model with every stored file of it, its local models and "
        "its SWAG statistics; deleting a global model also deletes its training.",
        responses={
            200: ModelMessageSerializer,
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="Only the owner or the training's actor may."),
            404: _MODEL_NOT_FOUND,
        },
    )
    def delete(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_delete_model(request.user, model)
        with transaction.atomic():
            modelstore.delete_model_files(model)
            model.delete()
        logger.info("model %s deleted by %s", id, request.user.pk)
        return Response({"detail": "Model removed!"})


# Models of a training


def _get_training(training_id: uuid.UUID | str, user: Any) -> Training:
    training = Training.objects.select_related("model").filter(pk=training_id).first()
    if training is None:
        raise NotFound(f"Training {training_id} was not found.")
    permissions.require_view_training(user, training)
    return training


_TRAINING_MODEL_RESPONSES: dict[Any, Any] = {
    200: ModelSerializer(many=True),
    401: _UNAUTHENTICATED,
    403: OpenApiResponse(description="Only the training's actor and participants may."),
    404: OpenApiResponse(description="No training has this id."),
}


class TrainingModels(APIView):
    @extend_schema(
        operation_id="trainings_models_list",
        summary="The global model of a training and its local models",
        responses=_TRAINING_MODEL_RESPONSES,
    )
    def get(self, request: Request, id: str) -> Response:
        training = _get_training(id, request.user)
        local_models = Model.objects.filter(
            kind=ModelKind.LOCAL, base_model_id=training.model_id
        ).order_by("round", "created_at")
        models = [training.model, *local_models]
        return Response(ModelSerializer(models, many=True).data)


class TrainingModelsLatest(APIView):
    @extend_schema(
        operation_id="trainings_models_latest_list",
        summary="The global model of a training and each participant's newest local model",
        responses=_TRAINING_MODEL_RESPONSES,
    )
    def get(self, request: Request, id: str) -> Response:
        training = _get_training(id, request.user)
        local_models = Model.objects.filter(
            kind=ModelKind.LOCAL, base_model_id=training.model_id
        ).order_by("owner_id", "-round", "-created_at")
        newest: dict[Any, Model] = {}
        for local_model in local_models:
            newest.setdefault(local_model.owner_id, local_model)
        models = [training.model, *sorted(newest.values(), key=lambda m: m.created_at)]
        return Response(ModelSerializer(models, many=True).data)
