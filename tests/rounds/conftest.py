"""Fixtures for the life-cycle tests: inline tasks, a fresh model store, upload helpers."""

from __future__ import annotations

import functools
import io
import threading
import uuid
from typing import Any

import pytest
import torch
from django.core.files.base import ContentFile

from fedserve import aggregation, modelstore, rounds, tasks
from fedserve.core.models import (
    Metric,
    Model,
    ModelKind,
    Notification,
    SwagStatistic,
    Training,
    User,
)
from tests.factories import TinyNet, make_training, make_user, torchscript_bytes


@pytest.fixture
def lifecycle(settings, model_store, transactional_db) -> None:
    """Run background tasks inline, against a database without a wrapping transaction.

    An in-process runner that an earlier test started would run the periodic sweep on its
    own thread, racing with the test, so it is stopped first.
    """
    tasks.stop_in_process_runner()
    settings.FEDSERVE_TASKS_EAGER = True


class AggregationCounter:
    """Counts calls of `aggregation.aggregate` and `aggregation.average_swag_moments`."""

    def __init__(self) -> None:
        self.updates = 0
        self.moments = 0
        self._lock = threading.Lock()

    def wrap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        aggregate = aggregation.aggregate
        average = aggregation.average_swag_moments

        def counted_aggregate(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.updates += 1
            return aggregate(*args, **kwargs)

        def counted_average(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.moments += 1
            return average(*args, **kwargs)

        monkeypatch.setattr(aggregation, "aggregate", counted_aggregate)
        monkeypatch.setattr(aggregation, "average_swag_moments", counted_average)


@pytest.fixture
def aggregations(monkeypatch) -> AggregationCounter:
    counter = AggregationCounter()
    counter.wrap(monkeypatch)
    return counter


def constant_state(value: float) -> dict[str, torch.Tensor]:
    """Return a TinyNet state dict with every entry set to `value`."""
    return {key: torch.full_like(tensor, value) for key, tensor in TinyNet().state_dict().items()}


def global_state(training: Training) -> dict[str, torch.Tensor]:
    from fedserve import modelfiles

    model = Model.objects.get(pk=training.model_id)
    with modelstore.open_file(model.weights_path) as handle:
        return modelfiles.load_state_dict(handle, model.weights_format)


def store_update(
    training: Training, user: User, *, value: float = 1.0, sample_size: int = 10
) -> Model:
    """Store a participant's local update for the model's current round, without the hook.

    The file is stored before the row is inserted, as an upload view does, so a racing
    round check never reads a row without its file.
    """
    model = Model.objects.get(pk=training.model_id)
    local_id = uuid.uuid4()
    buffer = io.BytesIO()
    torch.save(constant_state(value), buffer)
    path = modelstore.save(
        modelstore.model_file_path(local_id, "weights.pt"), ContentFile(buffer.getvalue())
    )
    return Model.objects.create(
        id=local_id,
        kind=ModelKind.LOCAL,
        owner=user,
        base_model=model,
        round=model.round,
        sample_size=sample_size,
        name=f"update of {user.username}",
        weights_path=path,
        weights_format="state_dict",
    )


def upload_update(
    training: Training, user: User, *, value: float = 1.0, sample_size: int = 10
) -> Model:
    """Store a local update and call the life-cycle hook, as the upload view does."""
    local = store_update(training, user, value=value, sample_size=sample_size)
    rounds.local_model_uploaded(local)
    return local


def upload_metrics(training: Training, user: User, value: float = 0.5) -> None:
    model = Model.objects.get(pk=training.model_id)
    Metric.objects.create(
        model=model, identifier="accuracy", value_float=value, step=model.round, reporter=user
    )
    rounds.metrics_uploaded(model, user.pk)


def upload_swag(
    training: Training, user: User, *, first: float, second: float, sample_size: int = 10
) -> SwagStatistic:
    model = Model.objects.get(pk=training.model_id)
    numel = sum(t.numel() for t in TinyNet().state_dict().values())
    statistic = SwagStatistic(model=model, owner=user, round=model.round, sample_size=sample_size)
    paths = []
    for name, value in (("first", first), ("second", second)):
        buffer = io.BytesIO()
        torch.save(torch.full((numel,), value), buffer)
        paths.append(
            modelstore.save(f"swag/{statistic.pk}/{name}.pt", ContentFile(buffer.getvalue()))
        )
    statistic.first_moment_path, statistic.second_moment_path = paths
    statistic.save()
    rounds.swag_statistic_uploaded(model, user.pk)
    return statistic


def received(user: User, notification_type: str | None = None) -> list[dict[str, Any]]:
    """Return the bodies of the notifications stored for `user`, oldest first."""
    rows = Notification.objects.filter(recipient=user).order_by("id")
    if notification_type is not None:
        rows = rows.filter(notification_type=notification_type)
    return [row.body for row in rows]


def types_received(user: User) -> list[str]:
    return list(
        Notification.objects.filter(recipient=user)
        .order_by("id")
        .values_list("notification_type", flat=True)
    )


@functools.cache
def tiny_torchscript() -> bytes:
    """Return one TinyNet TorchScript archive, scripted once per test session."""
    return torchscript_bytes()


def make_tiny_model(owner: User) -> Model:
    """Create a GLOBAL model row with a stored TinyNet TorchScript file."""
    model_id = uuid.uuid4()
    path = modelstore.save(
        modelstore.model_file_path(model_id, "weights.pt"), ContentFile(tiny_torchscript())
    )
    return Model.objects.create(
        id=model_id,
        owner=owner,
        name="tiny",
        weights_path=path,
        weights_format="torchscript",
        weights_size=len(tiny_torchscript()),
        input_shape=[None, 4],
    )


def started_training(
    participants: int | list[User] = 3, *, actor: User | None = None, **fields: Any
) -> tuple[Training, User, list[User]]:
    """Create a started training; actor and participants (who pull) are new unless given."""
    actor = actor or make_user(actor=True)
    if isinstance(participants, int):
        users = [make_user(client=True) for _ in range(participants)]
    else:
        users = participants
    fields.setdefault("model", make_tiny_model(actor))
    training = make_training(actor, users, **fields)
    assert rounds.start_training(training)
    return Training.objects.get(pk=training.pk), actor, users


def fresh(training: Training) -> Training:
    return Training.objects.select_related("model").get(pk=training.pk)
