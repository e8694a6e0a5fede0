import logging
import socket

import pytest

import fedserve.tasks
from fedserve.core.models import Notification, Participation
from fedserve.notify import DeliveryState, NotificationType, delivery, send, webhook
from fedserve.notify import tasks as notify_tasks
from tests.factories import make_training, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_webhooks")]


def _round_start(recipient, training, round_number=1):
    (notification,) = send(
        [recipient.pk],
        training,
        NotificationType.UPDATE_ROUND_START,
        {"round": round_number, "global_model_uuid": str(training.model_id)},
    )
    return notification


def _state(notification):
    notification.refresh_from_db()
    return notification.delivery_state


def _run(scheduled):
    """Run the recorded tasks, including those they schedule, until none is left."""
    while scheduled:
        call = scheduled.pop(0)
        assert call.name == "notify.deliver"
        notify_tasks.deliver(*call.args)


@pytest.fixture
def participant(webhook_server):
    return make_user(message_endpoint=webhook_server.url)


@pytest.fixture
def training(participant):
    return make_training(make_user(), [participant])


def test_deliver_success_posts_payload(scheduled, webhook_server, participant, training):
    notification = _round_start(participant, training)

    notify_tasks.deliver(str(participant.pk))

    notification.refresh_from_db()
    assert notification.delivery_state == DeliveryState.DELIVERED
    assert notification.delivery_attempts == 1
    assert notification.delivered_at is not None
    assert [r.payload for r in webhook_server.received] == [notification.payload()]
    assert scheduled == []


def test_deliver_logs_each_attempt_with_ids(
    scheduled, webhook_server, participant, training, caplog
):
    notification = _round_start(participant, training, round_number=4)
    webhook_server.respond_with(500, 200)
    caplog.set_level(logging.INFO, logger="fedserve.notify")

    notify_tasks.deliver(str(participant.pk))
    _run(scheduled)

    attempts = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert [r.levelno for r in attempts] == [logging.WARNING, logging.INFO]
    for record in attempts:
        message = record.getMessage()
        assert f"notification {notification.pk} " in message
        assert str(training.pk) in message
        assert "round 4" in message
        assert str(participant.pk) in message


def test_deliver_server_error_then_success(scheduled, webhook_server, participant, training):
    notification = _round_start(participant, training)
    webhook_server.respond_with(500)

    notify_tasks.deliver(str(participant.pk))

    assert _state(notification) == DeliveryState.RETRY_WAIT
    (retry,) = scheduled
    assert retry.args == (str(participant.pk), notification.pk, 1)
    # First retry: between half and all of FEDSERVE_WEBHOOK_BACKOFF_SECONDS (0.01 s).
    assert 0.005 <= retry.countdown <= 0.01

    _run(scheduled)

    notification.refresh_from_db()
    assert notification.delivery_state == DeliveryState.DELIVERED
    assert notification.delivery_attempts == 2
    assert len(webhook_server.received) == 2


def test_deliver_network_error_retries(scheduled, participant, training, caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    participant.message_endpoint = f"http://127.0.0.1:{port}/hook"
    participant.save()
    notification = _round_start(participant, training)

    notify_tasks.deliver(str(participant.pk))

    assert _state(notification) == DeliveryState.RETRY_WAIT
    assert len(scheduled) == 1
    assert any(
        r.levelno == logging.WARNING and "network error" in r.getMessage() for r in caplog.records
    )


def test_deliver_hanging_endpoint_times_out(scheduled, webhook_server, participant, training):
    notification = _round_start(participant, training)
    webhook_server.respond_with("hang")

    notify_tasks.deliver(str(participant.pk))

    assert _state(notification) == DeliveryState.RETRY_WAIT
    _run(scheduled)
    assert _state(notification) == DeliveryState.DELIVERED
    assert len(webhook_server.received) == 2


def test_deliver_rejection_removes_participant(
    scheduled, webhook_server, participant, training, rounds_hooks
):
    first = _round_start(participant, training, round_number=1)
    queued = _round_start(participant, training, round_number=2)
    webhook_server.respond_with(404, 404)

    notify_tasks.deliver(str(participant.pk))

    assert _state(first) == DeliveryState.REJECTED
    assert _state(queued) == DeliveryState.CANCELLED
    assert not Participation.objects.filter(training=training, user=participant).exists()
    assert rounds_hooks["rejected"] == [(training.pk, participant.pk)]
    removed = Notification.objects.get(notification_type=NotificationType.CLIENT_REMOVED)
    assert removed.recipient_id == participant.pk
    assert removed.training_id == training.pk
    assert "404" in removed.body["reason"]


def test_deliver_rejected_client_removed_ends(
    scheduled, webhook_server, participant, training, rounds_hooks
):
    _round_start(participant, training)
    webhook_server.respond_with(404, 404)

    notify_tasks.deliver(str(participant.pk))
    _run(scheduled)

    assert webhook_server.types_received() == ["UPDATE_ROUND_START", "CLIENT_REMOVED"]
    removed = Notification.objects.get(notification_type=NotificationType.CLIENT_REMOVED)
    assert removed.delivery_state == DeliveryState.REJECTED
    assert Notification.objects.count() == 2
    assert len(rounds_hooks["rejected"]) == 1


def test_deliver_rejection_by_actor_keeps_training(scheduled, webhook_server, rounds_hooks):
    actor = make_user(message_endpoint=webhook_server.url)
    participant = make_user()
    training = make_training(actor, [participant])
    (finished,) = send([actor.pk], training, NotificationType.TRAINING_FINISHED, {})
    webhook_server.respond_with(403)

    notify_tasks.deliver(str(actor.pk))

    assert _state(finished) == DeliveryState.REJECTED
    assert rounds_hooks["rejected"] == []
    assert list(training.participants.all()) == [participant]
    assert Notification.objects.count() == 1


def test_deliver_retries_exhausted_marks_unreachable(
    scheduled, webhook_server, participant, training, rounds_hooks
):
    notification = _round_start(participant, training)
    webhook_server.respond_with(502, 502, 503)

    notify_tasks.deliver(str(participant.pk))
    _run(scheduled)

    notification.refresh_from_db()
    assert notification.delivery_state == DeliveryState.FAILED
    assert notification.delivery_attempts == 3
    assert Participation.objects.get(training=training, user=participant).unreachable
    assert rounds_hooks["unreachable"] == [(training.pk, participant.pk)]
    assert rounds_hooks["rejected"] == []


def test_deliver_success_clears_unreachable(
    scheduled, webhook_server, participant, training, rounds_hooks
):
    Participation.objects.filter(training=training, user=participant).update(unreachable=True)
    _round_start(participant, training)

    notify_tasks.deliver(str(participant.pk))

    assert not Participation.objects.get(training=training, user=participant).unreachable


def test_deliver_backoff_grows_per_attempt(
    scheduled, webhook_server, participant, training, settings, rounds_hooks
):
    settings.FEDSERVE_WEBHOOK_MAX_ATTEMPTS = 4
    settings.FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS = 1.0
    _round_start(participant, training)
    webhook_server.respond_with(500, 500, 500, 500)

    countdowns = []
    notify_tasks.deliver(str(participant.pk))
    while scheduled:
        call = scheduled.pop(0)
        countdowns.append(call.countdown)
        notify_tasks.deliver(*call.args)

    # Backoff 0.01 s doubles per attempt: retry n waits between half and all of 0.01 * 2**(n-1).
    assert len(countdowns) == 3
    for number, countdown in enumerate(countdowns, start=1):
        assert 0.01 * 2 ** (number - 1) / 2 <= countdown <= 0.01 * 2 ** (number - 1)


def test_retry_delay_is_capped(settings):
    settings.FEDSERVE_WEBHOOK_BACKOFF_SECONDS = 2
    settings.FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS = 300
    assert 1.0 <= delivery.retry_delay(1) <= 2.0
    assert 8.0 <= delivery.retry_delay(4) <= 16.0
    assert 150.0 <= delivery.retry_delay(1000) <= 300.0


def test_deliver_keeps_order_per_recipient(scheduled, webhook_server, participant, training):
    start = send([participant.pk], training, NotificationType.TRAINING_START, {})[0]
    webhook_server.respond_with(500)
    notify_tasks.deliver(str(participant.pk))
    assert _state(start) == DeliveryState.RETRY_WAIT
    retry = scheduled.pop()

    # A newer notification and a plain trigger must not overtake the one waiting to retry.
    round_start = _round_start(participant, training)
    notify_tasks.deliver(str(participant.pk))
    assert _state(round_start) == DeliveryState.PENDING
    assert len(webhook_server.received) == 1

    notify_tasks.deliver(*retry.args)

    assert webhook_server.types_received() == [
        "TRAINING_START",
        "TRAINING_START",
        "UPDATE_ROUND_START",
    ]
    assert _state(round_start) == DeliveryState.DELIVERED


def test_deliver_posts_notification_stored_during_post(
    scheduled, webhook_server, participant, training, monkeypatch
):
    first = _round_start(participant, training, round_number=1)
    post = webhook.post_notification
    stored = []

    def post_and_store_next(*args, **kwargs):
        if not stored:
            stored.append(_round_start(participant, training, round_number=2))
            # The new notification's own task finds the first one SENDING and leaves.
            notify_tasks.deliver(str(participant.pk))
            assert len(webhook_server.received) == 0
        return post(*args, **kwargs)

    monkeypatch.setattr(webhook, "post_notification", post_and_store_next)

    notify_tasks.deliver(str(participant.pk))

    assert [r.payload["body"]["round"] for r in webhook_server.received] == [1, 2]
    assert _state(first) == DeliveryState.DELIVERED
    assert _state(stored[0]) == DeliveryState.DELIVERED


def test_deliver_twice_posts_once(scheduled, webhook_server, participant, training):
    notification = _round_start(participant, training)
    claimed = delivery._claim_oldest(participant.pk, None)
    assert claimed is not None

    # A second worker finds the notification in SENDING and leaves it alone.
    notify_tasks.deliver(str(participant.pk))
    # A stale retry with an old attempt count does not take it over either.
    notify_tasks.deliver(str(participant.pk), notification.pk, 0)

    assert webhook_server.received == []
    assert _state(notification) == DeliveryState.SENDING


def test_deliver_pull_only_makes_no_attempt(scheduled, webhook_server):
    puller = make_user()
    training = make_training(make_user(), [puller])

    notification = _round_start(puller, training)
    notify_tasks.deliver(str(puller.pk))

    notification.refresh_from_db()
    assert notification.delivery_state == DeliveryState.PULL_ONLY
    assert notification.delivery_attempts == 0
    assert scheduled == []
    assert webhook_server.received == []


def test_deliver_endpoint_removed_becomes_pull_only(
    scheduled, webhook_server, participant, training
):
    notification = _round_start(participant, training)
    participant.message_endpoint = ""
    participant.save()

    notify_tasks.deliver(str(participant.pk))

    notification.refresh_from_db()
    assert notification.delivery_state == DeliveryState.PULL_ONLY
    assert notification.delivery_attempts == 0
    assert webhook_server.received == []


def test_deliver_redirect_is_retried_not_followed(scheduled, webhook_server, participant, training):
    notification = _round_start(participant, training)
    webhook_server.respond_with(302)

    notify_tasks.deliver(str(participant.pk))

    assert _state(notification) == DeliveryState.RETRY_WAIT
    assert [r.path for r in webhook_server.received] == ["/hook"]


def test_deliver_logs_no_endpoint_secrets(scheduled, webhook_server, training, caplog):
    host_and_port = webhook_server.url.removeprefix("http://")
    participant = make_user(message_endpoint=f"http://s3cr3t-token:@{host_and_port}/k3y")
    training.participants.add(participant)
    caplog.set_level(logging.INFO, logger="fedserve.notify")

    _round_start(participant, training)
    notify_tasks.deliver(str(participant.pk))

    assert webhook_server.received[0].authorization is not None
    assert caplog.records
    assert all("s3cr3t" not in r.getMessage() for r in caplog.records)
    assert all("k3y" not in r.getMessage() for r in caplog.records)


def test_sweep_schedules_waiting_recipients(scheduled, webhook_server, participant, training):
    puller = make_user()
    training.participants.add(puller)
    waiting = _round_start(participant, training)
    _round_start(puller, training)

    notify_tasks.sweep()

    (call,) = scheduled
    assert call.args == (str(participant.pk),)
    assert call.countdown == 0
    _run(scheduled)
    assert _state(waiting) == DeliveryState.DELIVERED


def test_sweep_takes_over_stalled_send(scheduled, webhook_server, participant, training):
    notification = _round_start(participant, training)
    # A worker claimed the notification and died before recording the response.
    delivery._claim_oldest(participant.pk, None)

    notify_tasks.sweep()

    (call,) = scheduled
    assert call.args == (str(participant.pk), notification.pk, 1)
    # Connect 1 s + read 0.3 s + max backoff 0.04 s + 30 s margin.
    assert call.countdown == pytest.approx(31.34)
    _run(scheduled)
    notification.refresh_from_db()
    assert notification.delivery_state == DeliveryState.DELIVERED
    assert notification.delivery_attempts == 2


@pytest.mark.django_db(transaction=True)
def test_send_delivers_through_task_queue(webhook_server, settings, monkeypatch):
    # Eager mode runs tasks in this thread when the transaction commits, and keeps delayed
    # ones for run_deferred.
    settings.FEDSERVE_TASKS_EAGER = True
    monkeypatch.setattr(fedserve.tasks, "_deferred", [])
    participant = make_user(message_endpoint=webhook_server.url)
    training = make_training(make_user(), [participant])
    webhook_server.respond_with(503)

    notification = _round_start(participant, training)

    assert _state(notification) == DeliveryState.RETRY_WAIT
    assert fedserve.tasks.run_deferred() == 1
    assert _state(notification) == DeliveryState.DELIVERED
    assert webhook_server.types_received() == ["UPDATE_ROUND_START", "UPDATE_ROUND_START"]
