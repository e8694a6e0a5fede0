import pytest

from fedserve.client import Notification, NotificationType
from fedserve.client._client import _parse_feed

TRAINING = "6f1c2b1e-8f4e-4a37-9d55-1b2c3d4e5f60"
MODEL = "0d9a4c1e-1111-4a37-9d55-1b2c3d4e5f60"


def test_from_json_reads_wire_format():
    notification = Notification.from_json(
        {
            "notification_type": "UPDATE_ROUND_START",
            "training_uuid": TRAINING,
            "body": {"round": 3, "global_model_uuid": MODEL},
        }
    )
    assert notification.type is NotificationType.UPDATE_ROUND_START
    assert notification.training_id == TRAINING
    assert notification.round == 3
    assert notification.model_id == MODEL
    assert notification.sequence is None


def test_from_json_keeps_unknown_type_as_text():
    notification = Notification.from_json(
        {"notification_type": "SOMETHING_NEW", "training_uuid": TRAINING, "body": {}}
    )
    assert notification.type == "SOMETHING_NEW"
    assert notification.round is None


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"training_uuid": TRAINING},
        {"notification_type": "", "training_uuid": TRAINING},
        {"notification_type": "TRAINING_START", "body": [1, 2]},
    ],
)
def test_from_json_rejects_malformed(payload):
    with pytest.raises(ValueError):
        Notification.from_json(payload)


def test_repeated_delivery_has_same_key():
    payload = {
        "notification_type": "MODEL_TEST_ROUND",
        "training_uuid": TRAINING,
        "body": {"round": 2, "global_model_uuid": MODEL},
    }
    first = Notification.from_json(payload, sequence=4)
    again = Notification.from_json(payload, sequence=9)
    assert first.key == again.key


def test_parse_feed_orders_by_sequence():
    feed = [
        {
            "seq": 7,
            "notification_type": "UPDATE_ROUND_START",
            "training_uuid": TRAINING,
            "body": {"round": 0, "global_model_uuid": MODEL},
            "created_at": "2025-01-01T00:00:01Z",
        },
        {
            "seq": 5,
            "notification_type": "TRAINING_START",
            "training_uuid": TRAINING,
            "body": {"global_model_uuid": MODEL},
            "created_at": "2025-01-01T00:00:00Z",
        },
    ]
    notifications = _parse_feed(feed)
    assert [n.sequence for n in notifications] == [5, 7]
    assert notifications[0].type is NotificationType.TRAINING_START


def test_parse_feed_rejects_non_list():
    with pytest.raises(ValueError, match="not a list"):
        _parse_feed({"detail": "nope"})
