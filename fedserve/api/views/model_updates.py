"""Local update upload (POST models/<id>/) and its checks against the global model."""

from __future__ import annotations

import functools
import tempfile
from functools import partial
from typing import Any

from django.conf import settings
from django.core.files import File
from django.db import IntegrityError, transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from fedserve import modelfiles, modelstore, rounds
from fedserve.api import permissions
from fedserve.api.errors import Conflict
from fedserve.api.serializers.models import LocalModelUploadSerializer, ModelMessageSerializer
from fedserve.api.views.model_common import (
    _MODEL_NOT_FOUND,
    _TOO_LARGE,
    _UNAUTHENTICATED,
    _UNSUPPORTED_MEDIA,
    _check_round,
    _get_model,
    _metric_rows,
    _store_new_files,
    _user,
)
from fedserve.core.models import (
    FileFormat,
    Metric,
    Model,
    ModelKind,
    RoundPhase,
    Training,
    TrainingState,
)
from fedserve.rounds.locking import locked_training

_UPDATE_PHASES = (RoundPhase.UPDATE, RoundPhase.DAISY_CHAIN)


# ModelDetail's POST handler, which stores a participant's local update of the model. It has no
# docstring, because drf-spectacular shows an inherited class docstring as the description of
# each ModelDetail operation that sets none.
class LocalUpdateUploadMixin:
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


def _check_accepts_updates(training: Training, model: Model) -> None:
    if training.state != TrainingState.ONGOING or training.phase not in _UPDATE_PHASES:
        raise ValidationError(
            {
                "detail": f"Training {training.pk} does not accept local updates now (state "
                f"{training.state!r}, phase {training.phase or 'none'!r}); send the update "
                "after the server announces an update round."
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
