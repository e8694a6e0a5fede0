"""The round switch: decide that a phase is over and move the training on, exactly once.

A check runs in up to three short transactions, each holding the training's row lock:

1. Check and claim: count the deliveries of the current phase. When the phase is over and
   needs no heavy work (a test round, a FedDC hand-over), record the event at once. When
   it needs an aggregation, claim the round: the phase becomes AGGREGATING with a lease.
2. Outside any transaction, the claim holder aggregates into new round-specific files
   while a heartbeat extends the lease.
3. Commit: if the claim is still the holder's, switch the model to the new files, record
   the event and store its notifications, all in one transaction.

A duplicate check finds the round claimed or already switched and does nothing. A claim
whose holder died lapses after the lease, and the periodic sweep claims it again.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import uuid
from collections.abc import Callable
from uuid import UUID

from django.db import connection, transaction
from django.utils import timezone

from fedserve import config, modelstore, notify
from fedserve.core.models import (
    Model,
    ModelKind,
    RoundPhase,
    SwagStatistic,
    Training,
    TrainingState,
)
from fedserve.rounds import deadlines, weights
from fedserve.rounds.events import (
    DaisyChainRoundFinished,
    Event,
    ModelTestFinished,
    RoundAggregated,
    RoundFailed,
    SwagMomentsAveraged,
)
from fedserve.rounds.locking import locked_training
from fedserve.rounds.options import OptionsError, TrainingOptions
from fedserve.rounds.progress import AGGREGATING, COLLECTING_PHASES, measure
from fedserve.rounds.transitions import aggregation_due, apply

logger = logging.getLogger(__name__)

# How long a claim on a round lasts without a heartbeat; the holder renews it every third.
LEASE_SECONDS = config.env_int("FEDSERVE_ROUND_LEASE_SECONDS", 60, minimum=1)

# Errors in the updates themselves: aggregating again cannot help, so the training fails.
_DATA_ERRORS = (ValueError, TypeError, KeyError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A worker's hold on a round's aggregation; `started_at` identifies the claim."""

    training_id: uuid.UUID
    round: int
    swag: bool
    started_at: datetime.datetime

    @property
    def attempt(self) -> str:
        return format(int(self.started_at.timestamp() * 1_000_000), "x")


def check_round(training_id: UUID | str) -> None:
    """Move the training on if its current phase is over; safe to call any number of times."""
    if not _may_need_switch(training_id):
        return
    claim = _check_and_claim(training_id)
    if claim is not None:
        _aggregate_and_commit(claim)


def record(
    training: Training,
    options: TrainingOptions,
    event: Event,
    now: datetime.datetime,
    *,
    model_fields: tuple[str, ...] = (),
) -> None:
    """Apply `event` to a locked training, save it and its model, and store the notifications."""
    messages = apply(training, options, event, now=now)
    training.save(
        update_fields=[
            "state",
            "phase",
            "phase_round",
            "phase_started_at",
            "phase_deadline",
            "error_reason",
            "last_update",
        ]
    )
    training.model.save(update_fields=["kind", "round", "updated_at", *model_fields])
    for message in messages:
        notify.send(message.recipient_ids, training, message.notification_type, message.body)
    logger.info(
        "training %s: %s; now state %s, phase %s, round %s",
        training.pk,
        event,
        training.state,
        training.phase,
        training.phase_round,
    )


def _parse_options(training: Training) -> TrainingOptions | None:
    try:
        return TrainingOptions.parse(training.options)
    except OptionsError as error:
        record(
            training, TrainingOptions(), RoundFailed(f"Invalid options: {error}"), timezone.now()
        )
        return None


def _may_need_switch(training_id: UUID | str) -> bool:
    """Tell, without the row lock, whether the locked check could change the training.

    Every delivery schedules a check, and all but the last of a round find it still open.
    Reading first keeps those checks from taking the lock, which on SQLite is the
    database's single write lock that uploads wait for. A check runs after the transaction
    that scheduled it commits, so this read includes that delivery. The locked check decides
    again, so a stale True costs one locked check and nothing more.
    """
    training = Training.objects.filter(pk=training_id).first()
    if training is None or training.state not in (TrainingState.ONGOING, TrainingState.SWAG_ROUND):
        return False
    try:
        TrainingOptions.parse(training.options)
    except OptionsError:
        return True  # the locked check ends the training with the reason
    return deadlines.needs_check(training, timezone.now())


def _check_and_claim(training_id: UUID | str) -> Claim | None:
    now = timezone.now()
    with locked_training(training_id) as training:
        if training is None or training.state not in (
            TrainingState.ONGOING,
            TrainingState.SWAG_ROUND,
        ):
            return None
        options = _parse_options(training)
        if options is None:
            return None

        if training.phase == AGGREGATING:
            if not deadlines.passed(training, now):
                return None
            logger.warning(
                "training %s round %s: the aggregation claim of %s lapsed; claiming it again",
                training.pk,
                training.phase_round,
                training.phase_started_at,
            )
            return _claim(training, now)
        if training.phase not in COLLECTING_PHASES:
            return None

        progress = measure(training)
        if progress.expected == 0:
            reason = "Every participant left the training, so no round can finish."
            record(training, options, RoundFailed(reason), now)
            return None
        if not progress.complete:
            if not deadlines.passed(training, now):
                return None
            minimum = deadlines.minimum_deliveries(options)
            if progress.arrived < minimum:
                reason = deadlines.failure_reason(training, progress, minimum)
                record(training, options, RoundFailed(reason), now)
                return None
            logger.info(
                "training %s round %s: deadline passed with %d of %d participants; going on",
                training.pk,
                training.phase_round,
                progress.arrived,
                progress.expected,
            )

        round_number = training.phase_round
        if training.phase == RoundPhase.MODEL_TEST:
            record(training, options, ModelTestFinished(round_number), now)
            return None
        if training.phase != RoundPhase.SWAG and not aggregation_due(
            training, options, round_number
        ):
            record(training, options, DaisyChainRoundFinished(round_number), now)
            return None
        return _claim(training, now)


def _claim(training: Training, now: datetime.datetime) -> Claim:
    training.phase = AGGREGATING
    training.phase_started_at = now
    training.phase_deadline = now + datetime.timedelta(seconds=LEASE_SECONDS)
    training.save(update_fields=["phase", "phase_started_at", "phase_deadline", "last_update"])
    logger.info("training %s round %s: claimed for aggregation", training.pk, training.phase_round)
    return Claim(
        training_id=training.pk,
        round=training.phase_round,
        swag=training.state == TrainingState.SWAG_ROUND,
        started_at=now,
    )


def _holds(training: Training | None, claim: Claim) -> bool:
    return (
        training is not None
        and training.phase == AGGREGATING
        and training.phase_round == claim.round
        and training.phase_started_at == claim.started_at
    )


def _aggregate_and_commit(claim: Claim) -> None:
    training = Training.objects.select_related("model").get(pk=claim.training_id)
    stop_heartbeat = _start_heartbeat(claim)
    try:
        if claim.swag:
            moments = weights.average_moments(training, claim.round, claim.attempt)
        else:
            aggregated = weights.aggregate_updates(training, claim.round, claim.attempt)
    except weights.NothingToAggregate as error:
        logger.warning("training %s round %s: %s", claim.training_id, claim.round, error)
        _release(claim)
        return
    except _DATA_ERRORS as error:
        logger.exception("training %s round %s: aggregation failed", claim.training_id, claim.round)
        _fail_claimed(claim, f"Aggregation of round {claim.round} failed: {error}")
        return
    finally:
        stop_heartbeat()

    if claim.swag:
        _commit_moments(claim, moments)
    else:
        _commit_aggregation(claim, aggregated)


def _commit_aggregation(claim: Claim, aggregated: weights.AggregatedWeights) -> None:
    now = timezone.now()
    with locked_training(claim.training_id) as training:
        if training is None or not _holds(training, claim) or training.model.round != claim.round:
            logger.warning(
                "training %s round %s: the claim was lost before the commit; discarding %s",
                claim.training_id,
                claim.round,
                aggregated.path,
            )
            transaction.on_commit(lambda: modelstore.delete([aggregated.path]))
            return
        options = TrainingOptions.parse(training.options)
        model: Model = training.model
        stale_paths = [model.weights_path] if model.weights_path != aggregated.path else []
        model.weights_path = aggregated.path
        model.weights_size = aggregated.size
        model.round = claim.round + 1

        if options.delete_local_models_after_aggregation:
            # Earlier rounds' updates go too: FedDC keeps them for the hand-overs until now,
            # and a deadline can leave late ones behind.
            local = Model.objects.filter(
                kind=ModelKind.LOCAL, base_model_id=model.pk, round__lte=claim.round
            )
            stale_paths += [path for row in local for path in row.storage_paths()]
            local.delete()

        record(
            training,
            options,
            RoundAggregated(claim.round),
            now,
            model_fields=("weights_path", "weights_size"),
        )
        transaction.on_commit(_deleter(stale_paths))


def _commit_moments(claim: Claim, moments: weights.AveragedMoments) -> None:
    now = timezone.now()
    new_paths = [moments.first_moment_path, moments.second_moment_path]
    with locked_training(claim.training_id) as training:
        if training is None or not _holds(training, claim):
            logger.warning(
                "training %s round %s: the claim was lost before the commit; discarding moments",
                claim.training_id,
                claim.round,
            )
            transaction.on_commit(_deleter(new_paths))
            return
        options = TrainingOptions.parse(training.options)
        model: Model = training.model
        stale_paths = [
            path
            for path in (model.swag_first_moment_path, model.swag_second_moment_path)
            if path and path not in new_paths
        ]
        model.swag_first_moment_path = moments.first_moment_path
        model.swag_second_moment_path = moments.second_moment_path

        statistics = SwagStatistic.objects.filter(model_id=model.pk, round__lte=claim.round)
        stale_paths += [path for row in statistics for path in row.storage_paths()]
        statistics.delete()

        record(
            training,
            options,
            SwagMomentsAveraged(claim.round),
            now,
            model_fields=("swag_first_moment_path", "swag_second_moment_path"),
        )
        transaction.on_commit(_deleter(stale_paths))


def _release(claim: Claim) -> None:
    """Give a claimed round back to its collecting phase, with a fresh deadline."""
    now = timezone.now()
    with locked_training(claim.training_id) as training:
        if training is None or not _holds(training, claim):
            return
        options = TrainingOptions.parse(training.options)
        if claim.swag:
            phase = RoundPhase.SWAG
        elif claim.round > 0 and not aggregation_due(training, options, claim.round - 1):
            phase = RoundPhase.DAISY_CHAIN
        else:
            phase = RoundPhase.UPDATE
        training.phase = phase
        training.phase_started_at = now
        training.phase_deadline = (
            now + datetime.timedelta(seconds=options.round_timeout_seconds)
            if options.round_timeout_seconds is not None
            else None
        )
        training.save(update_fields=["phase", "phase_started_at", "phase_deadline", "last_update"])


def _fail_claimed(claim: Claim, reason: str) -> None:
    with locked_training(claim.training_id) as training:
        if training is None or not _holds(training, claim):
            return
        record(training, TrainingOptions(), RoundFailed(reason), timezone.now())


def _deleter(paths: list[str]) -> Callable[[], None]:
    def delete() -> None:
        try:
            modelstore.delete(paths)
        except OSError:
            # NOTE: a file left behind here stays until its model is deleted.
            logger.exception("could not delete replaced model files %s", paths)

    return delete


def _start_heartbeat(claim: Claim) -> Callable[[], None]:
    """Renew the claim's lease every third of it until the returned function is called."""
    stopped = threading.Event()

    def beat() -> None:
        try:
            while not stopped.wait(LEASE_SECONDS / 3):
                renewed = Training.objects.filter(
                    pk=claim.training_id, phase=AGGREGATING, phase_started_at=claim.started_at
                ).update(phase_deadline=timezone.now() + datetime.timedelta(seconds=LEASE_SECONDS))
                if not renewed:
                    return
        except Exception:
            logger.exception(
                "training %s: renewing the aggregation claim failed", claim.training_id
            )
        finally:
            connection.close()

    thread = threading.Thread(target=beat, name=f"claim-{claim.training_id}", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join()

    return stop
