import pytest
from django.db import transaction

from fedserve.core.models import Notification
from fedserve.notify import DeliveryState, NotificationType, send
from tests.factories import make_training, make_user

pytestmark = pytest.mark.django_db


def test_send_stores_one_row_per_recipient(scheduled, django_capture_on_commit_callbacks):
    hooked = make_user(message_endpoint="http://127.0.0.1:9/hook")
    puller = make_user()
    training = make_training(make_user(), [hooked, puller])

    with django_capture_on_commit_callbacks(execute=True):
        stored = send(
            [hooked.pk, puller.pk, hooked.pk],
            training,
            NotificationType.TRAINING_START,
            {"global_model_uuid": str(training.model_id)},
        )

    assert [n.recipient_id for n in stored] == [hooked.pk, puller.pk]
    assert stored[0].pk < stored[1].pk
    assert stored[0].delivery_state == DeliveryState.PENDING
    assert stored[1].delivery_state == DeliveryState.PULL_ONLY
    assert Notification.objects.filter(training=training).count() == 2
    assert [(call.name, call.args) for call in scheduled] == [("notify.deliver", (str(hooked.pk),))]


def test_send_payload_follows_wire_contract(scheduled):
    user = make_user()
    training = make_training(make_user(), [user])

    (notification,) = send(
        [user.pk],
        training,
        NotificationType.UPDATE_ROUND_START,
        {"round": 3, "global_model_uuid": "x"},
    )

    assert notification.payload() == {
        "notification_type": "UPDATE_ROUND_START",
        "training_uuid": str(training.pk),
        "body": {"round": 3, "global_model_uuid": "x"},
    }


def test_send_schedules_nothing_before_commit(scheduled, django_capture_on_commit_callbacks):
    user = make_user(message_endpoint="http://127.0.0.1:9/hook")

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        send([user.pk], None, NotificationType.CLIENT_REMOVED, {})

    assert scheduled == []
    assert len(callbacks) == 1


def test_send_rolled_back_stores_nothing(scheduled, django_capture_on_commit_callbacks):
    user = make_user(message_endpoint="http://127.0.0.1:9/hook")

    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        send([user.pk], None, NotificationType.CLIENT_REMOVED, {})
        raise RuntimeError("roll back")

    assert Notification.objects.count() == 0
    assert scheduled == []


def test_send_unknown_type_raises(scheduled):
    user = make_user()
    with pytest.raises(ValueError, match="ROUND_OVER"):
        send([user.pk], None, "ROUND_OVER", {})
    assert Notification.objects.count() == 0


def test_send_unknown_user_raises(scheduled):
    user = make_user()
    user_id = user.pk
    user.delete()
    with pytest.raises(ValueError, match=str(user_id)):
        send([user_id], None, NotificationType.TRAINING_START, {})
