"""The training life cycle: the one place the API calls when a training changes.

Views call these hooks after their own transaction commits. Each hook only records what
happened and schedules a round check (`fedserve.rounds.tasks.check_round`) for after the
commit; none aggregates or sends HTTP inside a request. The modules:

- `events`: what can happen to a training, named as past facts;
- `transitions`: from an event to the next phase and its notifications;
- `progress`: who is expected in a phase and who delivered;
- `switch`: the exactly-once round switch (check, claim, aggregate, commit);
- `weights`: the aggregation work that runs outside transactions;
- `deadlines`: the round deadline policy and the periodic sweep;
- `daisy_chain`: FedDC's hand-over of local models between participants.
"""

from __future__ import annotations

import logging
from uuid import UUID

from django.utils import timezone

from fedserve import tasks as task_queue
from fedserve.core.models import Model, Participation, Training, TrainingState
from fedserve.rounds.deadlines import CHECK_TASK
from fedserve.rounds.events import TrainingStarted
from fedserve.rounds.locking import locked_training
from fedserve.rounds.options import TrainingOptions

logger = logging.getLogger(__name__)


def start_training(training: Training) -> bool:
    """Move a training from state I to O and send the start of its first round.

    Returns False, changing nothing, when the training is no longer in state I (for example
    when two start requests race).
    """
    from fedserve.rounds import switch

    with locked_training(training.pk) as locked:
        if locked is None or locked.state != TrainingState.INITIAL:
            return False
        options = TrainingOptions.parse(locked.options)
        switch.record(locked, options, TrainingStarted(), timezone.now(), model_fields=())
    training.refresh_from_db()
    training.model.refresh_from_db()
    logger.info("training %s started", training.pk)
    return True


def local_model_uploaded(local_model: Model) -> None:
    """Note that a local update arrived; the round may now be complete."""
    training = local_model.get_training()
    logger.info(
        "training %s round %s: local model %s arrived from %s",
        training.pk if training else None,
        local_model.round,
        local_model.pk,
        local_model.owner_id,
    )
    if training is not None:
        _mark_reachable(training.pk, local_model.owner_id)
        schedule_check(training.pk)


def metrics_uploaded(model: Model, reporter_id: UUID | str) -> None:
    """Note that a participant reported test metrics for a global model."""
    training = model.get_training()
    if training is not None:
        _mark_reachable(training.pk, reporter_id)
        schedule_check(training.pk)


def swag_statistic_uploaded(model: Model, reporter_id: UUID | str) -> None:
    """Note that a participant uploaded SWAG moments."""
    training = model.get_training()
    if training is not None:
        _mark_reachable(training.pk, reporter_id)
        schedule_check(training.pk)


def participants_removed(training: Training) -> None:
    """Re-check the current round after participants left the training; this may complete it."""
    schedule_check(training.pk)


def participant_rejected(training_id: UUID | str, user_id: UUID | str) -> None:
    """Remove a participant whose message endpoint rejected a notification, and re-check."""
    removed, _ = Participation.objects.filter(training_id=training_id, user_id=user_id).delete()
    if removed:
        logger.warning(
            "training %s: participant %s removed because its endpoint rejected a notification",
            training_id,
            user_id,
        )
    schedule_check(training_id)


def participant_unreachable(training_id: UUID | str, user_id: UUID | str) -> None:
    """Mark a participant whose notifications could not be delivered; the deadline decides.

    The participant stays in the training. A round with `round_timeout_seconds` goes on at
    its deadline without it. A round without a deadline keeps waiting, because the
    participant may still pull its notifications and upload.
    """
    Participation.objects.filter(training_id=training_id, user_id=user_id).update(unreachable=True)
    logger.warning("training %s: participant %s is unreachable", training_id, user_id)
    schedule_check(training_id)


def schedule_check(training_id: UUID | str) -> None:
    """Schedule a round check for after the current transaction commits."""
    task_queue.enqueue_on_commit(CHECK_TASK, str(training_id))


def _mark_reachable(training_id: UUID | str, user_id: UUID | str) -> None:
    # Reading first, because on SQLite an UPDATE takes the database's write lock even when
    # no row matches, and almost every delivery comes from a participant marked reachable.
    flagged = Participation.objects.filter(
        training_id=training_id, user_id=user_id, unreachable=True
    )
    if flagged.exists():
        flagged.update(unreachable=False)
