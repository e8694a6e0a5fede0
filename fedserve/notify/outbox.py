"""Store notifications and schedule their webhook delivery."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from django.db import models, transaction

from fedserve import tasks as task_queue
from fedserve.core.models import Notification, Training, User

logger = logging.getLogger(__name__)

DELIVER_TASK = "notify.deliver"


class NotificationType(models.TextChoices):
    TRAINING_START = "TRAINING_START"
    UPDATE_ROUND_START = "UPDATE_ROUND_START"
    MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
    SWAG_ROUND_START = "SWAG_ROUND_START"
    TRAINING_FINISHED = "TRAINING_FINISHED"
    CLIENT_REMOVED = "CLIENT_REMOVED"


class DeliveryState(models.TextChoices):
    """Webhook delivery state of a stored notification (`Notification.delivery_state`)."""

    PENDING = "PENDING", "waiting for its first attempt"
    SENDING = "SENDING", "claimed by a worker that is posting it"
    RETRY_WAIT = "RETRY_WAIT", "waiting for a retry after a failed attempt"
    DELIVERED = "DELIVERED", "accepted by the endpoint with a 2xx answer"
    REJECTED = "REJECTED", "rejected by the endpoint with a 4xx answer"
    FAILED = "FAILED", "retries ran out"
    PULL_ONLY = "PULL_ONLY", "the recipient has no message endpoint and pulls"
    CANCELLED = "CANCELLED", "dropped because the recipient left the training"


# States from which a worker may still post the notification.
UNFINISHED_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.RETRY_WAIT)


def send(
    recipient_ids: Iterable[Any],
    training: Training | None,
    notification_type: str,
    body: dict[str, Any],
) -> list[Notification]:
    """Store one notification per recipient and deliver them after the transaction commits.

    The rows are written in the caller's transaction, so a rolled-back transaction sends
    nothing. Recipients without a message endpoint get PULL_ONLY rows that no worker posts.
    Duplicate ids are sent once; an unknown id raises ValueError.
    """
    if notification_type not in NotificationType.values:
        raise ValueError(
            f"unknown notification type {notification_type!r}. "
            f"Use one of {', '.join(NotificationType.values)}"
        )
    unique_ids = list(dict.fromkeys(uuid.UUID(str(recipient_id)) for recipient_id in recipient_ids))
    endpoints = {
        pk: endpoint
        for pk, endpoint in User.objects.filter(pk__in=unique_ids).values_list(
            "pk", "message_endpoint"
        )
    }
    missing = [recipient_id for recipient_id in unique_ids if recipient_id not in endpoints]
    if missing:
        raise ValueError(f"cannot notify unknown users {', '.join(map(str, missing))}")

    rows = [
        Notification(
            recipient_id=recipient_id,
            training=training,
            notification_type=notification_type,
            body=body,
            delivery_state=(
                DeliveryState.PENDING if endpoints[recipient_id] else DeliveryState.PULL_ONLY
            ),
        )
        for recipient_id in unique_ids
    ]
    with transaction.atomic():
        stored = Notification.objects.bulk_create(rows)
        for notification in stored:
            if notification.delivery_state == DeliveryState.PENDING:
                task_queue.enqueue_on_commit(DELIVER_TASK, str(notification.recipient_id))

    logger.info(
        "stored %s for training %s round %s: %d recipients (%d pull only)",
        notification_type,
        training.pk if training else None,
        body.get("round"),
        len(stored),
        sum(1 for n in stored if n.delivery_state == DeliveryState.PULL_ONLY),
    )
    return stored
