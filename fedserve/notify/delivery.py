"""Webhook delivery: each recipient's notifications are posted one at a time, in order.

Delivery states (`DeliveryState`) move like this:

    PENDING -> SENDING -> DELIVERED | REJECTED | FAILED | RETRY_WAIT | PULL_ONLY
    RETRY_WAIT -> SENDING
    PENDING | RETRY_WAIT -> CANCELLED (the recipient was removed from the training)

A worker may only claim a recipient's oldest unfinished notification, and it claims it
with a conditional UPDATE on (state, attempts). So two workers never post the same attempt,
and a notification is first posted only after the recipient's earlier ones are finished.
While the oldest waits for a retry, the newer ones wait too. A worker that dies between its
POST and recording the response leaves the notification in SENDING, and the sweep posts it
again. Delivery is therefore at least once, and an endpoint may receive a notification twice.
"""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from fedserve import rounds
from fedserve import tasks as task_queue
from fedserve.core.models import Notification, Participation
from fedserve.notify import webhook
from fedserve.notify.outbox import (
    DELIVER_TASK,
    UNFINISHED_STATES,
    DeliveryState,
    NotificationType,
    send,
)

logger = logging.getLogger(__name__)

# Extra seconds the sweep allows beyond the longest legitimate wait before it takes over.
_SWEEP_MARGIN_SECONDS = 30.0


def deliver_pending(recipient_id: uuid.UUID, resume: tuple[int, int] | None = None) -> None:
    """Post the recipient's unfinished notifications in order until one has to wait.

    A plain call starts only from a PENDING notification. `resume` is the (id, attempts)
    pair of a notification in RETRY_WAIT or SENDING. The call takes that notification over
    only if it has not changed since, which makes retries and sweeps safe to run twice.
    """
    while True:
        notification = _claim_oldest(recipient_id, resume)
        resume = None
        if notification is None or not _attempt(notification):
            return
        # A notification stored while this one was being posted found it unfinished and left
        # its delivery to this loop. This check is cheaper than a claim that finds nothing.
        if not Notification.objects.filter(
            recipient_id=recipient_id, delivery_state__in=UNFINISHED_STATES
        ).exists():
            return


def retry_delay(attempt: int) -> float:
    """Return the seconds to wait after failed attempt number `attempt` (counting from 1).

    The delay doubles with each attempt up to FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS, and a
    random factor between 0.5 and 1 spreads out retries of many recipients.
    """
    base = float(settings.FEDSERVE_WEBHOOK_BACKOFF_SECONDS)
    cap = float(settings.FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS)
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return random.uniform(delay / 2, delay)


def redrive_stalled() -> int:
    """Schedule delivery for every recipient whose oldest unfinished notification waits.

    A PENDING notification is scheduled at once, because its task may have been lost in a
    restart.
    One in SENDING or RETRY_WAIT is checked again after the longest legitimate wait (a
    whole attempt plus the longest backoff), and taken over only if it has not moved.
    Returns the number of recipients scheduled.
    """
    oldest_ids = (
        Notification.objects.filter(delivery_state__in=UNFINISHED_STATES)
        .values("recipient_id")
        .annotate(oldest_id=Min("id"))
        .values_list("oldest_id", flat=True)
    )
    oldest = Notification.objects.filter(pk__in=list(oldest_ids)).values_list(
        "pk", "recipient_id", "delivery_state", "delivery_attempts"
    )
    stall_seconds = (
        float(settings.FEDSERVE_WEBHOOK_CONNECT_TIMEOUT_SECONDS)
        + float(settings.FEDSERVE_WEBHOOK_TIMEOUT_SECONDS)
        + float(settings.FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS)
        + _SWEEP_MARGIN_SECONDS
    )
    count = 0
    for pk, recipient_id, state, attempts in oldest:
        if state == DeliveryState.PENDING:
            task_queue.enqueue(DELIVER_TASK, str(recipient_id))
        else:
            task_queue.enqueue(
                DELIVER_TASK, str(recipient_id), pk, attempts, countdown=stall_seconds
            )
        count += 1
    return count


def _claim_oldest(recipient_id: uuid.UUID, resume: tuple[int, int] | None) -> Notification | None:
    """Mark the recipient's oldest unfinished notification SENDING and return it, if allowed."""
    oldest = (
        Notification.objects.filter(recipient_id=recipient_id, delivery_state__in=UNFINISHED_STATES)
        .select_related("recipient")
        .order_by("id")
        .first()
    )
    if oldest is None:
        return None
    takes_over = resume == (oldest.pk, oldest.delivery_attempts)
    if oldest.delivery_state != DeliveryState.PENDING and not takes_over:
        # Another worker is posting it, or its retry is scheduled.
        return None

    claimed = Notification.objects.filter(
        pk=oldest.pk,
        delivery_state=oldest.delivery_state,
        delivery_attempts=oldest.delivery_attempts,
    ).update(delivery_state=DeliveryState.SENDING, delivery_attempts=oldest.delivery_attempts + 1)
    if not claimed:
        return None
    oldest.delivery_state = DeliveryState.SENDING
    oldest.delivery_attempts += 1
    return oldest


def _record(notification: Notification, **fields: Any) -> bool:
    """Store the result of the claimed attempt, or return False if another worker took it over."""
    updated = Notification.objects.filter(
        pk=notification.pk,
        delivery_state=DeliveryState.SENDING,
        delivery_attempts=notification.delivery_attempts,
    ).update(**fields)
    if not updated:
        logger.warning(
            "notification %s: another worker took over attempt %d, so this worker stops",
            notification.pk,
            notification.delivery_attempts,
        )
    return bool(updated)


def _attempt(notification: Notification) -> bool:
    """Post a claimed notification, record the response and return whether the next may follow."""
    endpoint = notification.recipient.message_endpoint
    if not endpoint:
        # The recipient switched to pulling after the notification was stored.
        return _record(
            notification,
            delivery_state=DeliveryState.PULL_ONLY,
            delivery_attempts=notification.delivery_attempts - 1,
        )

    max_attempts = int(settings.FEDSERVE_WEBHOOK_MAX_ATTEMPTS)
    attempt = webhook.post_notification(
        endpoint,
        notification.payload(),
        connect_timeout=float(settings.FEDSERVE_WEBHOOK_CONNECT_TIMEOUT_SECONDS),
        read_timeout=float(settings.FEDSERVE_WEBHOOK_TIMEOUT_SECONDS),
    )
    context = (
        notification.pk,
        notification.notification_type,
        notification.training_id,
        notification.body.get("round") if isinstance(notification.body, dict) else None,
        notification.recipient_id,
        webhook.loggable_endpoint(endpoint),
        notification.delivery_attempts,
        max_attempts,
    )
    line = "notification %s (%s, training %s, round %s) to participant %s at %s: attempt %d/%d"

    if attempt.outcome is webhook.Outcome.ACCEPTED:
        logger.info(
            line + " delivered, %s in %.0f ms",
            *context,
            attempt.reason,
            attempt.elapsed_seconds * 1000,
        )
        if not _record(
            notification, delivery_state=DeliveryState.DELIVERED, delivered_at=timezone.now()
        ):
            return False
        _clear_unreachable(notification)
        return True

    if attempt.outcome is webhook.Outcome.REJECTED:
        logger.warning(line + " rejected with %s", *context, attempt.reason)
        if not _record(notification, delivery_state=DeliveryState.REJECTED):
            return False
        _remove_rejecting_participant(notification, attempt.reason)
        return True

    if notification.delivery_attempts < max_attempts:
        delay = retry_delay(notification.delivery_attempts)
        logger.warning(line + " failed (%s); retrying in %.1f s", *context, attempt.reason, delay)
        if not _record(notification, delivery_state=DeliveryState.RETRY_WAIT):
            return False
        task_queue.enqueue(
            DELIVER_TASK,
            str(notification.recipient_id),
            notification.pk,
            notification.delivery_attempts,
            countdown=delay,
        )
        return False

    # NOTE: the recipient's next notification then starts its own full retry schedule, so
    # while an endpoint stays down, each queued notification waits for the previous schedule.
    logger.warning(line + " failed (%s); no attempts left", *context, attempt.reason)
    if not _record(notification, delivery_state=DeliveryState.FAILED):
        return False
    _mark_unreachable(notification)
    return True


def _clear_unreachable(notification: Notification) -> None:
    """Clear `unreachable` on all the recipient's participations, since its endpoint works."""
    cleared = Participation.objects.filter(
        user_id=notification.recipient_id, unreachable=True
    ).update(unreachable=False)
    if cleared:
        logger.info(
            "participant %s is reachable again (%d trainings)", notification.recipient_id, cleared
        )


def _mark_unreachable(notification: Notification) -> None:
    """Flag the participation as unreachable and call `rounds.participant_unreachable`."""
    if notification.training_id is None:
        return
    flagged = Participation.objects.filter(
        training_id=notification.training_id, user_id=notification.recipient_id
    ).update(unreachable=True)
    if not flagged:
        # The recipient is the actor, or has left the training.
        return
    logger.warning(
        "participant %s of training %s is unreachable: notification %s failed %d times",
        notification.recipient_id,
        notification.training_id,
        notification.pk,
        notification.delivery_attempts,
    )
    rounds.participant_unreachable(notification.training_id, notification.recipient_id)


def _remove_rejecting_participant(notification: Notification, reason: str) -> None:
    """Remove a participant whose endpoint rejected a notification, and send it CLIENT_REMOVED.

    A rejected CLIENT_REMOVED changes nothing more, so rejections cannot loop.
    """
    training = notification.training
    if training is None or notification.notification_type == NotificationType.CLIENT_REMOVED:
        return
    with transaction.atomic():
        removed, _ = Participation.objects.filter(
            training=training, user_id=notification.recipient_id
        ).delete()
        if not removed:
            # The recipient is the actor, or has already left the training.
            return
        Notification.objects.filter(
            recipient_id=notification.recipient_id,
            training=training,
            delivery_state__in=(DeliveryState.PENDING, DeliveryState.RETRY_WAIT),
        ).update(delivery_state=DeliveryState.CANCELLED)
        reason_text = f"your message endpoint rejected notification {notification.pk} ({reason})"
        send(
            [notification.recipient_id],
            training,
            NotificationType.CLIENT_REMOVED,
            {"reason": reason_text},
        )
    logger.warning(
        "participant %s removed from training %s: its endpoint rejected notification %s with %s",
        notification.recipient_id,
        training.pk,
        notification.pk,
        reason,
    )
    rounds.participant_rejected(training.pk, notification.recipient_id)
