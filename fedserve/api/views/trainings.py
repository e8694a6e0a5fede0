"""Trainings: create, list, read, delete, manage participants and start."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any, cast

from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve import modelstore, notify, rounds
from fedserve.api import permissions
from fedserve.api.errors import Conflict
from fedserve.api.serializers.trainings import (
    DetailSerializer,
    TrainingClientsSerializer,
    TrainingCreatedSerializer,
    TrainingCreateSerializer,
    TrainingSerializer,
)
from fedserve.core.models import (
    Model,
    ModelKind,
    Participation,
    Training,
    TrainingState,
    UncertaintyMethod,
    User,
)

_UNAUTHENTICATED = OpenApiResponse(description="Missing or invalid credentials.")
_NOT_FOUND = OpenApiResponse(description="No training has this id.")
_NOT_ACTOR = OpenApiResponse(description="Only the training's actor may do this.")
_NOT_INVOLVED = OpenApiResponse(description="Only the training's actor and participants may.")


class TrainingListCreate(APIView):
    @extend_schema(
        summary="Trainings you are the actor of",
        responses={200: TrainingSerializer(many=True), 401: _UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        trainings = (
            permissions.trainings_acted_by(request.user)
            .select_related("model")
            .order_by("created_at")
        )
        return Response(TrainingSerializer(trainings, many=True).data)

    @extend_schema(
        summary="Create a training",
        description=(
            "Only the model's owner may create a training on it, and the caller becomes the "
            "training's actor. A model that already belongs to a training is copied first "
            "(with its weights and preprocessing file, at round 0), so each training owns its "
            "model. MEAN and LOCAL models cannot be trained. With uncertainty_method SWAG, a "
            "GLOBAL model becomes a SWAG model, which also stores the aggregated moments."
        ),
        request=TrainingCreateSerializer,
        responses={
            201: TrainingCreatedSerializer,
            400: OpenApiResponse(
                description="Invalid fields, unknown client ids, an unknown option, or a "
                "model that cannot be trained."
            ),
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="You do not own the model."),
            404: OpenApiResponse(description="No model has this model_id."),
        },
        examples=[
            OpenApiExample(
                "FedAvg with two participants",
                request_only=True,
                value={
                    "model_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
                    "target_num_updates": 5,
                    "metric_names": ["accuracy"],
                    "aggregation_method": "FedAvg",
                    "uncertainty_method": "NONE",
                    "options": {},
                    "clients": [
                        "0b0c3f55-6a43-4c7e-9b77-0c1a2c9d8e01",
                        "6f1d2e4a-8d53-4b1f-a3a0-2f3e4d5c6b02",
                    ],
                },
            )
        ],
    )
    def post(self, request: Request) -> Response:
        serializer = TrainingCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data

        model = Model.objects.filter(pk=data["model_id"]).first()
        if model is None:
            raise NotFound(f"Model {data['model_id']} not found; check model_id.")
        permissions.require_create_training(request.user, model)
        _check_trainable(model)
        clients = _existing_users(data["clients"])

        copied_paths: list[str] = []
        try:
            with transaction.atomic():
                # The lock makes concurrent requests for one model take turns, so the second
                # finds the first one's training and trains a copy.
                locked = Model.objects.select_for_update().filter(pk=model.pk).first()
                if locked is None:
                    raise NotFound(f"Model {model.pk} was deleted while the training was created.")
                model = locked
                if Training.objects.filter(model=model).exists():
                    model = _copy_model(model, copied_paths)
                if data["uncertainty_method"] == UncertaintyMethod.SWAG:
                    _make_swag(model)
                training = Training.objects.create(
                    model=model,
                    actor=cast(User, request.user),
                    target_num_updates=data["target_num_updates"],
                    metric_names=data["metric_names"],
                    aggregation_method=data["aggregation_method"],
                    uncertainty_method=data["uncertainty_method"],
                    options=data["options"],
                )
                Participation.objects.bulk_create(
                    Participation(training=training, user=user) for user in clients
                )
        except BaseException:
            modelstore.delete(copied_paths)
            raise

        body = {"detail": "Training created successfully!", "training_id": str(training.pk)}
        return Response(body, status=status.HTTP_201_CREATED)


class TrainingDetail(APIView):
    @extend_schema(
        summary="One training with its round progress",
        responses={
            200: TrainingSerializer,
            401: _UNAUTHENTICATED,
            403: _NOT_INVOLVED,
            404: _NOT_FOUND,
        },
    )
    def get(self, request: Request, id: str) -> Response:
        training = get_object_or_404(Training.objects.select_related("model"), pk=id)
        permissions.require_view_training(request.user, training)
        return Response(TrainingSerializer(training).data)

    @extend_schema(
        summary="Delete a training with its model, local models and model files",
        responses={
            200: DetailSerializer,
            401: _UNAUTHENTICATED,
            403: _NOT_ACTOR,
            404: _NOT_FOUND,
        },
    )
    def delete(self, request: Request, id: str) -> Response:
        training = get_object_or_404(Training, pk=id)
        permissions.require_manage_training(request.user, training)

        with transaction.atomic():
            training = get_object_or_404(Training.objects.select_for_update(), pk=id)
            model = training.model
            # The files go after the commit, so no row ever points to a missing file.
            modelstore.delete_model_files(model)
            # Deleting the global model cascades to the training, its participations,
            # local models and SWAG statistics.
            model.delete()
        return Response({"detail": "Training removed!"})


class TrainingClients(APIView):
    @extend_schema(
        summary="Add participants",
        description="Participants can be added only before the training starts (state I), "
        "because a running round already counts on its participants.",
        request=TrainingClientsSerializer,
        responses={
            202: DetailSerializer,
            400: OpenApiResponse(description="Invalid body or unknown user ids."),
            401: _UNAUTHENTICATED,
            403: _NOT_ACTOR,
            404: _NOT_FOUND,
            409: OpenApiResponse(description="The training has already started."),
        },
    )
    def put(self, request: Request, id: str) -> Response:
        training = get_object_or_404(Training, pk=id)
        permissions.require_manage_training(request.user, training)
        serializer = TrainingClientsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        users = _existing_users(serializer.validated_data["clients"])

        with transaction.atomic():
            training = Training.objects.select_for_update().get(pk=training.pk)
            if training.state != TrainingState.INITIAL:
                raise Conflict(
                    f"Training {training.pk} is in state {training.state!r}; participants can "
                    "only be added in state 'I', before the training starts."
                )
            present = set(
                Participation.objects.filter(training=training).values_list("user_id", flat=True)
            )
            Participation.objects.bulk_create(
                Participation(training=training, user=user)
                for user in users
                if user.pk not in present
            )
        return Response({"detail": "Participants added."}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Remove participants",
        request=TrainingClientsSerializer,
        responses={
            200: DetailSerializer,
            400: OpenApiResponse(description="Invalid body, or ids that are not participants."),
            401: _UNAUTHENTICATED,
            403: _NOT_ACTOR,
            404: _NOT_FOUND,
        },
    )
    def delete(self, request: Request, id: str) -> Response:
        training = get_object_or_404(Training, pk=id)
        permissions.require_manage_training(request.user, training)
        serializer = TrainingClientsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        wanted = _unique(serializer.validated_data["clients"])

        with transaction.atomic():
            training = Training.objects.select_for_update().get(pk=training.pk)
            memberships = Participation.objects.filter(training=training, user_id__in=wanted)
            found = set(memberships.values_list("user_id", flat=True))
            absent = [user_id for user_id in wanted if user_id not in found]
            if absent:
                raise ValidationError(
                    {
                        "clients": [
                            f"These users are not participants of training {training.pk}: "
                            f"{_join(absent)}; remove only current participants."
                        ]
                    }
                )
            memberships.delete()
            if training.state in (TrainingState.ONGOING, TrainingState.SWAG_ROUND):
                # Participants of a running training wait for notifications; tell them to stop.
                notify.send(
                    sorted(found, key=str),
                    training,
                    notify.NotificationType.CLIENT_REMOVED,
                    {"reason": "removed from the training by its actor"},
                )
        rounds.participants_removed(training)
        return Response({"detail": "Participants removed."})


class TrainingStart(APIView):
    @extend_schema(
        summary="Start a training",
        request=None,
        responses={
            202: DetailSerializer,
            400: OpenApiResponse(description="The training has no participants or has started."),
            401: _UNAUTHENTICATED,
            403: _NOT_ACTOR,
            404: _NOT_FOUND,
        },
    )
    def post(self, request: Request, id: str) -> Response:
        training = get_object_or_404(Training, pk=id)
        permissions.require_manage_training(request.user, training)

        with transaction.atomic():
            training = Training.objects.select_for_update().get(pk=training.pk)
            if training.state != TrainingState.INITIAL:
                raise ValidationError(
                    {
                        "detail": f"Training {training.pk} is in state {training.state!r}; only "
                        "a training in state 'I' (initial) can be started."
                    }
                )
            if not Participation.objects.filter(training=training).exists():
                raise ValidationError(
                    {
                        "detail": f"Training {training.pk} has no participants; add some with "
                        "PUT trainings/<id>/clients/ before starting it."
                    }
                )
        if not rounds.start_training(training):
            # Another request started the training between the check above and now.
            raise ValidationError(
                {
                    "detail": f"Training {training.pk} has already been started; only a "
                    "training in state 'I' (initial) can be started."
                }
            )
        return Response({"detail": "Training started!"}, status=status.HTTP_202_ACCEPTED)


def _check_trainable(model: Model) -> None:
    if model.kind == ModelKind.MEAN:
        raise ValidationError(
            {
                "model_id": [
                    f"Model {model.pk} is a MEAN model, an ensemble of other models, and cannot "
                    "be trained; train each member model instead."
                ]
            }
        )
    if model.kind == ModelKind.LOCAL:
        raise ValidationError(
            {
                "model_id": [
                    f"Model {model.pk} is a local update; create trainings on global models only."
                ]
            }
        )


def _unique(ids: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(ids))


def _join(ids: Iterable[Any]) -> str:
    return ", ".join(str(user_id) for user_id in ids)


def _existing_users(ids: list[Any]) -> list[User]:
    """Return the users with these ids, in order, or raise 400 naming the unknown ones."""
    wanted = _unique(ids)
    users = {user.pk: user for user in User.objects.filter(pk__in=wanted)}
    unknown = [user_id for user_id in wanted if user_id not in users]
    if unknown:
        raise ValidationError(
            {"clients": [f"No users have these ids: {_join(unknown)}; check the user ids."]}
        )
    return [users[user_id] for user_id in wanted]


def _copy_model(model: Model, copied_paths: list[str]) -> Model:
    """Copy a global model and its files for a new training; the copy starts at round 0.

    SWAG moments are not copied because they describe the other training's rounds. Every
    stored path is appended to `copied_paths`, so the caller can delete them on failure.
    """
    copy = Model.objects.create(
        kind=model.kind,
        owner=model.owner,
        name=model.name,
        description=model.description,
        input_shape=model.input_shape,
        weights_format=model.weights_format,
        weights_size=model.weights_size,
        preprocessing_format=model.preprocessing_format,
    )
    if model.weights_path:
        copy.weights_path = _copy_file(model.weights_path, copy, copied_paths)
    if model.preprocessing_path:
        copy.preprocessing_path = _copy_file(model.preprocessing_path, copy, copied_paths)
    copy.save(update_fields=["weights_path", "preprocessing_path"])
    return copy


def _copy_file(source: str, model: Model, copied_paths: list[str]) -> str:
    destination = modelstore.model_file_path(model.pk, PurePosixPath(source).name)
    stored = modelstore.copy(source, destination)
    copied_paths.append(stored)
    return stored


def _make_swag(model: Model) -> None:
    """Turn a GLOBAL model into a SWAG model, which also stores the aggregated moments."""
    if model.kind == ModelKind.GLOBAL:
        model.kind = ModelKind.SWAG
        model.save(update_fields=["kind"])
