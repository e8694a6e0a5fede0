"""Model endpoints: upload, list, download and delete models, and their metadata, metrics,
preprocessing modules, local updates and SWAG moments.

The streaming multipart parser spools uploaded files to disk. `fedserve.modelfiles` checks
them, and accepted files move into the model store, so a rejected request leaves no file.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import uuid
from collections.abc import Iterable
from functools import partial
from typing import IO, Any, cast

import torch
from django.conf import settings
from django.core.files import File
from django.db import IntegrityError, transaction
from django.http import FileResponse, HttpResponseBase, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import renderers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import FormParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve import modelfiles, modelstats, modelstore, rounds
from fedserve.api import permissions
from fedserve.api.errors import Conflict
from fedserve.api.serializers.models import (
    LocalModelUploadSerializer,
    MeanModelUploadSerializer,
    MetricSerializer,
    MetricsUploadSerializer,
    ModelCreatedSerializer,
    ModelMessageSerializer,
    ModelMetadataSerializer,
    ModelSerializer,
    ModelUploadSerializer,
    PreprocessingUploadSerializer,
    SwagUploadSerializer,
)
from fedserve.api.uploads import LimitedJSONParser, StreamingMultiPartParser
from fedserve.core.models import (
    FileFormat,
    Metric,
    Model,
    ModelKind,
    RoundPhase,
    SwagStatistic,
    Training,
    TrainingState,
    User,
)
from fedserve.rounds.locking import locked_training

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

_UPDATE_PHASES = (RoundPhase.UPDATE, RoundPhase.DAISY_CHAIN)


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


class ModelDetail(APIView):
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
        operation_id="models_local_update_create",
        summary="Upload a local update",
        description=(
            "A participant's update of the global model for its current round, while the "
            "training waits for updates. model_file is a state dict (torch.save or "
            "safetensors) or a TorchScript archive whose keys, shapes and dtypes match the "
            "global model's exactly, with finite values. It is stored as a state dict."
        ),
        request={"multipart/form-data": LocalModelUploadSerializer},
        responses={
            201: ModelMessageSerializer,
            400: OpenApiResponse(
                description="Invalid fields, a wrong round, a training not waiting for "
                "updates, or weights that do not match the global model."
            ),
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="You are not a participant of the training."),
            404: _MODEL_NOT_FOUND,
            409: OpenApiResponse(description="You already sent an update for this round."),
            413: _TOO_LARGE,
            415: _UNSUPPORTED_MEDIA,
        },
    )
    def post(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_upload_local_model(request.user, model)
        if model.kind == ModelKind.LOCAL and model.base_model is not None:
            # A FedDC hand-over round names another participant's local model in its
            # notification; an update posted to that id belongs to the training's global model.
            model = model.base_model
        training = model.get_training()
        assert training is not None  # a participant's model always has a training
        _check_accepts_updates(training, model)

        serializer = LocalModelUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = serializer.validated_data
        _check_round(model, fields["round"])
        if _has_update(model, request.user, fields["round"]):
            raise _duplicate_update(model, fields["round"])

        weights = _prepare_update(fields["model_file"], model)
        local_model = Model(
            kind=ModelKind.LOCAL,
            owner=_user(request),
            base_model=model,
            name=model.name,
            description=f"Update of model {model.pk} for round {fields['round']}",
            round=fields["round"],
            sample_size=fields["sample_size"],
            input_shape=model.input_shape,
            weights_format=FileFormat.STATE_DICT,
        )
        try:
            (stored,) = _store_new_files(
                [(modelstore.model_file_path(local_model.pk, "weights.pt"), weights)]
            )
        finally:
            if weights is not fields["model_file"]:
                weights.close()
        try:
            local_model.weights_path = stored
            local_model.weights_size = modelstore.size(stored)
            with locked_training(training.pk) as locked:
                # The round may have switched while the file was checked and stored.
                if locked is None:
                    raise NotFound(f"The training of model {model.pk} was deleted.")
                _check_accepts_updates(locked, locked.model)
                _check_round(locked.model, fields["round"])
                local_model.save()
                rows = _metric_rows(local_model, fields["metrics"], local_model.round, request.user)
                Metric.objects.bulk_create(rows)
                transaction.on_commit(partial(rounds.local_model_uploaded, local_model))
        except IntegrityError:
            modelstore.delete([stored])
            raise _duplicate_update(model, fields["round"]) from None
        except BaseException:
            modelstore.delete([stored])
            raise

        return Response({"detail": "Model Update Accepted"}, status=status.HTTP_201_CREATED)

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


def _check_accepts_updates(training: Training, model: Model) -> None:
    if training.state != TrainingState.ONGOING or training.phase not in _UPDATE_PHASES:
        raise ValidationError(
            {
                "detail": f"Training {training.pk} does not accept local updates now (state "
                f"{training.state!r}, phase {training.phase or 'none'!r}); send the update "
                "after the server announces an update round."
            }
        )


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


def _has_update(model: Model, user: Any, round_number: int) -> bool:
    return Model.objects.filter(
        kind=ModelKind.LOCAL, base_model=model, owner_id=user.pk, round=round_number
    ).exists()


def _duplicate_update(model: Model, round_number: int) -> Conflict:
    return Conflict(
        f"You already sent an update of model {model.pk} for round {round_number}; wait for "
        "the next round."
    )


@functools.lru_cache(maxsize=32)
def _expected_state(model_id: str, weights_path: str, weights_format: str) -> dict[str, Any]:
    """Return the keys, shapes and dtypes of a stored global model as meta tensors.

    No tensor data is read, except from the archives that `modelfiles.read_state_dict_layout`
    loads whole. The weights path changes with every aggregation, so caching by path reads
    each global model once per round and process instead of once per update.
    """
    with modelstore.open_file(weights_path) as handle:
        return modelfiles.read_state_dict_layout(handle, weights_format)


def _prepare_update(upload: File[Any], global_model: Model) -> File[Any]:
    """Check a local update against its global model; return the state dict file to store.

    A torch.save state dict is kept as uploaded; other formats are converted, so that
    aggregation reads state dicts only.
    """
    try:
        fmt = modelfiles.detect_format(upload)
        if fmt == FileFormat.TORCHSCRIPT and settings.FEDSERVE_WEIGHTS_ONLY_UPDATES:
            raise ValidationError(
                {
                    "model_file": [
                        "This server accepts local updates only as weights "
                        "(FEDSERVE_WEIGHTS_ONLY_UPDATES is on), not as TorchScript; send "
                        "torch.save(model.state_dict(), path) or a safetensors file."
                    ]
                }
            )
        expected = _expected_state(
            str(global_model.pk), global_model.weights_path, global_model.weights_format
        )
        received = modelfiles.load_state_dict(upload, fmt, map_location="meta")
        mismatch = modelfiles.describe_mismatch(expected, received)
        if mismatch is None:
            problem = modelfiles.find_non_finite(upload, fmt)
            mismatch = f"{problem}; send finite weights" if problem else None
    except modelfiles.ModelFileError as error:
        raise ValidationError({"model_file": [str(error)]}) from None
    if mismatch is not None:
        raise ValidationError(
            {"model_file": [f"The update does not fit model {global_model.pk}: {mismatch}."]}
        )

    upload.seek(0)
    if fmt == FileFormat.STATE_DICT:
        return upload
    # NOTE: converting loads the whole update into memory, unlike the streamed checks of a
    # torch.save state dict; clients with large models should send state dicts.
    state_dict = modelfiles.load_state_dict(upload, fmt)
    # The caller closes it, which deletes it unless the model store moved it into place.
    spool = tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, suffix=".pt")  # noqa: SIM115
    modelfiles.save_state_dict(state_dict, spool)
    spool.seek(0)
    return modelstore.SpooledFile(spool)


# Metadata, metrics, preprocessing


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


# SWAG


class ModelSwag(APIView):
    parser_classes = [StreamingMultiPartParser]

    @extend_schema(
        operation_id="models_swag_create",
        summary="Upload SWAG moments",
        description=(
            "During a SWAG round (training state S), each participant sends the first and "
            "second moments of its model's flattened floating-point parameters, in "
            "module.parameters() order: two 1-D float tensors saved with torch.save, each "
            "as long as the global model has such parameter values."
        ),
        request={"multipart/form-data": SwagUploadSerializer},
        responses={
            201: ModelMessageSerializer,
            400: OpenApiResponse(
                description="Invalid fields, a wrong round, no SWAG round, or moments of the "
                "wrong format, shape or values."
            ),
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="You are not a participant of the training."),
            404: _MODEL_NOT_FOUND,
            409: OpenApiResponse(description="You already sent moments for this round."),
            413: _TOO_LARGE,
            415: _UNSUPPORTED_MEDIA,
        },
    )
    def post(self, request: Request, id: str) -> Response:
        model = _get_model(id)
        permissions.require_upload_swag(request.user, model)
        _require_global(model, "send SWAG moments for")
        training = model.get_training()
        assert training is not None  # a participant's model always has a training
        _check_swag_round(training)

        serializer = SwagUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = serializer.validated_data
        _check_round(model, fields["round"])
        if SwagStatistic.objects.filter(
            model=model, owner_id=request.user.pk, round=fields["round"]
        ).exists():
            raise _duplicate_swag(model, fields["round"])

        length = _float_parameter_count(model)
        first = _check_moment("first_moment_file", fields["first_moment_file"], length)
        second = _check_moment("second_moment_file", fields["second_moment_file"], length)
        if bool((second < 0).any()):
            raise ValidationError(
                {
                    "second_moment_file": [
                        "The second moment (mean of squared parameters) has negative values; "
                        "send the mean of the squares, not the variance or a log."
                    ]
                }
            )
        del first, second

        statistic = SwagStatistic(
            model=model,
            owner=_user(request),
            round=fields["round"],
            sample_size=fields["sample_size"],
        )
        stored = _store_new_files(
            [
                (
                    modelstore.swag_file_path(statistic.pk, "first_moment.pt"),
                    fields["first_moment_file"],
                ),
                (
                    modelstore.swag_file_path(statistic.pk, "second_moment.pt"),
                    fields["second_moment_file"],
                ),
            ]
        )
        statistic.first_moment_path, statistic.second_moment_path = stored
        try:
            with locked_training(training.pk) as locked:
                if locked is None:
                    raise NotFound(f"The training of model {model.pk} was deleted.")
                _check_swag_round(locked)
                _check_round(locked.model, fields["round"])
                statistic.save()
                transaction.on_commit(
                    partial(rounds.swag_statistic_uploaded, model, _user(request).pk)
                )
        except IntegrityError:
            modelstore.delete(stored)
            raise _duplicate_swag(model, fields["round"]) from None
        except BaseException:
            modelstore.delete(stored)
            raise
        return Response({"detail": "SWAG Statistic Accepted"}, status=status.HTTP_201_CREATED)


def _check_swag_round(training: Training) -> None:
    if training.state != TrainingState.SWAG_ROUND:
        raise ValidationError(
            {
                "detail": f"Training {training.pk} is in state {training.state!r}, not in a "
                "SWAG round ('S'); send SWAG moments after the server announces a SWAG round."
            }
        )


def _duplicate_swag(model: Model, round_number: int) -> Conflict:
    return Conflict(f"You already sent SWAG moments for model {model.pk} and round {round_number}.")


def _float_parameter_count(model: Model) -> int:
    # The layout reader reads no tensor data of a TorchScript archive, unlike torch.jit.load.
    with modelstore.open_file(model.weights_path) as handle:
        layout = modelfiles.read_module_layout(handle, model.weights_format)
    return modelfiles.count_float_parameters(layout.parameters)


def _check_moment(field: str, upload: IO[bytes], length: int) -> torch.Tensor:
    try:
        tensor = modelfiles.load_tensor(upload)
    except modelfiles.ModelFileError as error:
        raise ValidationError({field: [str(error)]}) from None
    upload.seek(0)

    problem = None
    if tensor.dim() != 1 or not tensor.is_floating_point():
        problem = f"is a {tensor.dim()}-D {tensor.dtype} tensor; send a 1-D floating-point tensor"
    elif tensor.numel() != length:
        problem = (
            f"has {tensor.numel()} values, but the global model has {length} floating-point "
            "parameter values"
        )
    elif not bool(torch.isfinite(tensor).all()):
        problem = "contains NaN or infinite values; send finite moments"
    if problem:
        raise ValidationError({field: [f"The moment {problem}."]})
    return tensor


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
