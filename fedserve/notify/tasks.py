"""Background tasks of webhook delivery: per-recipient delivery and the periodic sweep."""

from __future__ import annotations

import uuid

from fedserve.notify import delivery
from fedserve.notify.outbox import DELIVER_TASK
from fedserve.tasks import periodic, task

SWEEP_TASK = "notify.sweep"
SWEEP_INTERVAL_SECONDS = 60.0


@task(DELIVER_TASK)
def deliver(
    recipient_id: str, resume_id: int | None = None, resume_attempts: int | None = None
) -> None:
    """Post a recipient's waiting notifications in order (see `delivery.deliver_pending`)."""
    resume = None
    if resume_id is not None and resume_attempts is not None:
        resume = (resume_id, resume_attempts)
    delivery.deliver_pending(uuid.UUID(recipient_id), resume)


@task(SWEEP_TASK)
def sweep() -> None:
    """Re-schedule deliveries whose task was lost, for example in a restart."""
    delivery.redrive_stalled()


periodic(SWEEP_TASK, SWEEP_INTERVAL_SECONDS)
