"""Background tasks: a Celery app in production, an in-process runner on the embedded default.

`enqueue` is the only way code schedules work. Tasks take ids, are idempotent, and are
acknowledged late, so a task that dies with its worker runs again.
"""

from __future__ import annotations

import logging

from celery import Celery
from django.conf import settings

logger = logging.getLogger(__name__)

app = Celery("fedserve")
app.conf.update(
    broker_url=settings.CELERY_BROKER_URL or "memory://",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="fedserve",
    broker_connection_retry_on_startup=True,
)
