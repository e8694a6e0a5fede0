"""The training life cycle: the one place the API calls when a training changes.

Views call these hooks after their own transaction commits. Each hook only records what
happened and schedules background work; none aggregates or sends HTTP inside a request.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from fedserve.core.models import Model, RoundPhase, Training, TrainingState

logger = logging.getLogger(__name__)


def start_training(training: Training) -> None:
    """Move a training from state I to O and begin its first round."""
    with transaction.atomic():
        locked = Training.objects.select_for_update().get(pk=training.pk)
        locked.state = TrainingState.ONGOING
        locked.phase = RoundPhase.UPDATE
        locked.phase_round = locked.model.round
        locked.phase_started_at = timezone.now()
        locked.save(
            update_fields=["state", "phase", "phase_round", "phase_started_at", "last_update"]
        )
    training.refresh_from_db()
    logger.info("training %s started", training.pk)


def local_model_uploaded(local_model: Model) -> None:
    """Note that a local update arrived; the round may now be complete."""
    logger.info(
        "local model %s for round %s arrived from %s",
        local_model.pk,
        local_model.round,
        local_model.owner_id,
    )


def metrics_uploaded(model: Model, reporter_id: object) -> None:
    """Note that a participant reported test metrics for a global model."""


def swag_statistic_uploaded(model: Model, reporter_id: object) -> None:
    """Note that a participant uploaded SWAG moments."""


def participants_removed(training: Training) -> None:
    """Re-check the current round after participants left the training."""
