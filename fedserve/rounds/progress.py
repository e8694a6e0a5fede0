"""How far the current phase of a training has come: who is expected and who delivered."""

from __future__ import annotations

import dataclasses
from typing import Any

from django.db.models import QuerySet

from fedserve.core.models import (
    Metric,
    Model,
    ModelKind,
    Participation,
    RoundPhase,
    SwagStatistic,
    Training,
)

# Training.phase while a worker has claimed the round for aggregation.
AGGREGATING = RoundPhase.AGGREGATING

COLLECTING_PHASES = (
    RoundPhase.UPDATE,
    RoundPhase.DAISY_CHAIN,
    RoundPhase.SWAG,
    RoundPhase.MODEL_TEST,
)


@dataclasses.dataclass(frozen=True)
class Progress:
    """Participants expected in the current phase and how many of them have delivered."""

    expected: int
    arrived: int

    @property
    def complete(self) -> bool:
        return self.expected > 0 and self.arrived >= self.expected


def participant_ids(training: Training) -> QuerySet[Participation, Any]:
    """Return the current participants' user ids as a subquery."""
    return Participation.objects.filter(training_id=training.pk).values("user_id")


def local_updates(training: Training, round_number: int) -> QuerySet[Model]:
    """Return the current participants' local models for a round, in a stable order.

    The order is by username, not by the random user id, so that a training repeated with
    the same users sums its updates in the same order and gets bit-identical weights.
    """
    return Model.objects.filter(
        kind=ModelKind.LOCAL,
        base_model_id=training.model_id,
        round=round_number,
        owner_id__in=participant_ids(training),
    ).order_by("owner__username", "owner_id")


def swag_statistics(training: Training, round_number: int) -> QuerySet[SwagStatistic]:
    """Return the current participants' SWAG statistics for a round, in a stable order."""
    return SwagStatistic.objects.filter(
        model_id=training.model_id,
        round=round_number,
        owner_id__in=participant_ids(training),
    ).order_by("owner__username", "owner_id")


def metric_reporters(training: Training, round_number: int) -> QuerySet[Metric, Any]:
    """Return the distinct participants who reported metrics for the global model's round."""
    return (
        Metric.objects.filter(
            model_id=training.model_id,
            step=round_number,
            reporter_id__in=participant_ids(training),
        )
        .values("reporter_id")
        .distinct()
    )


def measure(training: Training) -> Progress:
    """Count the deliveries for the training's current phase and round."""
    expected = Participation.objects.filter(training_id=training.pk).count()
    round_number = training.phase_round
    if training.phase in (RoundPhase.UPDATE, RoundPhase.DAISY_CHAIN):
        arrived = local_updates(training, round_number).count()
    elif training.phase == RoundPhase.SWAG:
        arrived = swag_statistics(training, round_number).count()
    elif training.phase == RoundPhase.MODEL_TEST:
        arrived = metric_reporters(training, round_number).count()
    else:
        arrived = 0
    return Progress(expected=expected, arrived=arrived)
