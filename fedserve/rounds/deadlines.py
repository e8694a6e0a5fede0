"""Round deadlines and the periodic sweep that re-drives trainings.

Policy, with the options `round_timeout_seconds` and `min_updates`: every phase that waits
for participants (updates, SWAG moments, test metrics) gets a deadline when it starts.
When the deadline passes with at least `min_updates` deliveries (1 when unset), the round
goes on with what arrived. Participants who missed it stay in the training and are
expected again in the next phase. With fewer deliveries the training ends in state E, and the reason
is stored in `error_reason`.
"""

from __future__ import annotations

import datetime
import logging

from django.utils import timezone

from fedserve import tasks
from fedserve.core.models import Training, TrainingState
from fedserve.rounds.options import TrainingOptions
from fedserve.rounds.progress import AGGREGATING, COLLECTING_PHASES, Progress, measure

logger = logging.getLogger(__name__)

CHECK_TASK = "rounds.check_round"


def passed(training: Training, now: datetime.datetime) -> bool:
    """Tell whether the training's current phase (or claim) has a deadline that passed."""
    return training.phase_deadline is not None and training.phase_deadline <= now


def minimum_deliveries(options: TrainingOptions) -> int:
    """Return how many deliveries let a phase go on at its deadline."""
    return options.min_updates if options.min_updates is not None else 1


def failure_reason(training: Training, progress: Progress, minimum: int) -> str:
    """Describe a missed deadline for `Training.error_reason`."""
    return (
        f"The {training.get_phase_display()} phase of round {training.phase_round} reached its "
        f"deadline with {progress.arrived} of {progress.expected} participants delivered, "
        f"but options.min_updates requires at least {minimum}."
    )


def needs_check(training: Training, now: datetime.datetime) -> bool:
    """Tell whether a round switch may be due: a complete phase, a deadline, a lapsed claim,
    or no participants left (the check then ends the training).
    """
    if training.phase == AGGREGATING:
        return passed(training, now)
    if training.phase not in COLLECTING_PHASES:
        return False
    if passed(training, now):
        return True
    progress = measure(training)
    return progress.complete or progress.expected == 0


def sweep() -> int:
    """Schedule a round check for every ongoing training that needs one; return how many.

    Round checks are idempotent, so a training checked twice is harmless. The sweep only
    makes sure that no trigger is lost (a restart, a dropped task, a passed deadline).
    """
    now = timezone.now()
    ongoing = Training.objects.filter(
        state__in=(TrainingState.ONGOING, TrainingState.SWAG_ROUND)
    ).only("id", "model_id", "phase", "phase_round", "phase_deadline", "state")
    due = [training.pk for training in ongoing if needs_check(training, now)]
    for training_id in due:
        tasks.enqueue(CHECK_TASK, str(training_id))
    if due:
        logger.info("sweep scheduled round checks for %d trainings", len(due))
    return len(due)
