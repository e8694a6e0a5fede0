"""SWAG moment upload: each participant's first and second moments in a SWAG round."""

from __future__ import annotations

from functools import partial
from typing import IO

import torch
from django.db import IntegrityError, transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve import modelfiles, modelstore, rounds
from fedserve.api import permissions
from fedserve.api.errors import Conflict
from fedserve.api.serializers.models import ModelMessageSerializer, SwagUploadSerializer
from fedserve.api.uploads import StreamingMultiPartParser
from fedserve.api.views.model_common import (
    _MODEL_NOT_FOUND,
    _TOO_LARGE,
    _UNAUTHENTICATED,
    _UNSUPPORTED_MEDIA,
    _check_round,
    _get_model,
    _require_global,
    _store_new_files,
    _user,
)
from fedserve.core.models import Model, SwagStatistic, Training, TrainingState
from fedserve.rounds.locking import locked_training


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
