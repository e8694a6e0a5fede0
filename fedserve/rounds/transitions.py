"""Transitions: from an event to the training's next phase and the notifications for it.

`apply` changes the training (and its global model) in memory only. The caller has the
training's row lock, saves both and sends the returned messages in the same transaction.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from typing import Any

from fedserve.core.models import (
    AggregationMethod,
    Model,
    ModelKind,
    Participation,
    RoundPhase,
    Training,
    TrainingState,
    UncertaintyMethod,
)
from fedserve.rounds import daisy_chain
from fedserve.rounds.events import (
    DaisyChainRoundFinished,
    Event,
    ModelTestFinished,
    RoundAggregated,
    RoundFailed,
    SwagMomentsAveraged,
    TrainingStarted,
)
from fedserve.rounds.options import TrainingOptions
from fedserve.rounds.progress import local_updates

# Notification types on the wire.
TRAINING_START = "TRAINING_START"
UPDATE_ROUND_START = "UPDATE_ROUND_START"
MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
SWAG_ROUND_START = "SWAG_ROUND_START"
TRAINING_FINISHED = "TRAINING_FINISHED"


@dataclasses.dataclass(frozen=True)
class Message:
    """One notification to send to some users."""

    recipient_ids: tuple[uuid.UUID, ...]
    notification_type: str
    body: dict[str, Any]


def total_rounds(training: Training, options: TrainingOptions) -> int:
    """Return the number of training rounds; FedDC runs `daisy_chain_period` per aggregation."""
    if training.aggregation_method == AggregationMethod.FEDDC:
        return training.target_num_updates * options.daisy_chain_period
    return training.target_num_updates


def aggregation_due(training: Training, options: TrainingOptions, round_number: int) -> bool:
    """Tell whether the updates of `round_number` are aggregated (else FedDC passes them on)."""
    if training.aggregation_method != AggregationMethod.FEDDC:
        return True
    return (round_number + 1) % options.daisy_chain_period == 0


def apply(
    training: Training, options: TrainingOptions, event: Event, *, now: datetime.datetime
) -> list[Message]:
    """Move the training past `event` and return the notifications that announce the result."""
    match event:
        case TrainingStarted():
            return _start(training, options, now)
        case DaisyChainRoundFinished(round=round_number):
            return _pass_on_updates(training, options, round_number, now)
        case RoundAggregated(round=round_number):
            return _after_aggregation(training, options, round_number + 1, now)
        case SwagMomentsAveraged(round=round_number):
            return _after_swag(training, options, round_number, now)
        case ModelTestFinished(round=round_number):
            return _after_test(training, options, round_number, now)
        case RoundFailed(reason=reason):
            return _fail(training, reason)
    raise TypeError(f"unknown event {event!r}")


def _participants(training: Training) -> tuple[uuid.UUID, ...]:
    return tuple(
        Participation.objects.filter(training_id=training.pk)
        .order_by("user_id")
        .values_list("user_id", flat=True)
    )


def _begin_phase(
    training: Training,
    options: TrainingOptions,
    phase: RoundPhase,
    round_number: int,
    now: datetime.datetime,
) -> None:
    training.phase = phase
    training.phase_round = round_number
    training.phase_started_at = now
    training.phase_deadline = (
        now + datetime.timedelta(seconds=options.round_timeout_seconds)
        if options.round_timeout_seconds is not None
        else None
    )


def _round_start(training: Training, options: TrainingOptions, model_id: object) -> dict[str, Any]:
    model: Model = training.model
    body: dict[str, Any] = {"round": model.round, "global_model_uuid": str(model_id)}
    if training.aggregation_method == AggregationMethod.FEDPROX:
        body["mu"] = options.mu
    return body


def _start(training: Training, options: TrainingOptions, now: datetime.datetime) -> list[Message]:
    model: Model = training.model
    if training.uncertainty_method == UncertaintyMethod.SWAG and model.kind == ModelKind.GLOBAL:
        # The averaged moments are stored on the model, which only a SWAG model holds.
        model.kind = ModelKind.SWAG
    training.state = TrainingState.ONGOING
    training.error_reason = ""
    _begin_phase(training, options, RoundPhase.UPDATE, model.round, now)

    participants = _participants(training)
    return [
        Message(participants, TRAINING_START, {"global_model_uuid": str(model.pk)}),
        Message(participants, UPDATE_ROUND_START, _round_start(training, options, model.pk)),
    ]


def _pass_on_updates(
    training: Training, options: TrainingOptions, round_number: int, now: datetime.datetime
) -> list[Message]:
    model: Model = training.model
    updates = dict(local_updates(training, round_number).values_list("owner_id", "id"))
    participants = _participants(training)
    assignment = daisy_chain.assign_models(
        list(participants), updates, seed=f"{training.pk}:{round_number + 1}"
    )

    model.round = round_number + 1
    _begin_phase(training, options, RoundPhase.DAISY_CHAIN, model.round, now)
    return [
        Message((recipient,), UPDATE_ROUND_START, _round_start(training, options, model_id))
        for recipient, model_id in assignment.items()
    ]


def _after_aggregation(
    training: Training, options: TrainingOptions, round_number: int, now: datetime.datetime
) -> list[Message]:
    if training.uncertainty_method != UncertaintyMethod.SWAG:
        return _after_swag(training, options, round_number, now)

    training.state = TrainingState.SWAG_ROUND
    _begin_phase(training, options, RoundPhase.SWAG, round_number, now)
    body = {"round": round_number, "global_model_uuid": str(training.model_id)}
    return [Message(_participants(training), SWAG_ROUND_START, body)]


def _after_swag(
    training: Training, options: TrainingOptions, round_number: int, now: datetime.datetime
) -> list[Message]:
    training.state = TrainingState.ONGOING
    final = round_number >= total_rounds(training, options)
    if options.skip_model_tests or not (options.model_test_after_each_round or final):
        return _after_test(training, options, round_number, now)

    _begin_phase(training, options, RoundPhase.MODEL_TEST, round_number, now)
    body = {"round": round_number, "global_model_uuid": str(training.model_id)}
    return [Message(_participants(training), MODEL_TEST_ROUND, body)]


def _after_test(
    training: Training, options: TrainingOptions, round_number: int, now: datetime.datetime
) -> list[Message]:
    if round_number >= total_rounds(training, options):
        return _finish(training)

    _begin_phase(training, options, RoundPhase.UPDATE, round_number, now)
    body = _round_start(training, options, training.model_id)
    return [Message(_participants(training), UPDATE_ROUND_START, body)]


def _finish(training: Training) -> list[Message]:
    training.state = TrainingState.COMPLETED
    training.phase = RoundPhase.NONE
    training.phase_deadline = None
    participants = _participants(training)
    recipients = (
        participants
        if training.actor_id in participants
        else (
            *participants,
            training.actor_id,
        )
    )
    body = {"global_model_uuid": str(training.model_id)}
    return [Message(recipients, TRAINING_FINISHED, body)]


def _fail(training: Training, reason: str) -> list[Message]:
    training.state = TrainingState.ERROR
    training.phase = RoundPhase.NONE
    training.phase_deadline = None
    training.error_reason = reason
    return []
