import json

import requests

from fedserve.client import NotificationType, WebhookReceiver

TRAINING = "6f1c2b1e-8f4e-4a37-9d55-1b2c3d4e5f60"


def test_receiver_queues_notification_and_answers_200():
    with WebhookReceiver() as receiver:
        assert receiver.url.startswith("http://127.0.0.1:")
        response = requests.post(
            receiver.url,
            json={
                "notification_type": "UPDATE_ROUND_START",
                "training_uuid": TRAINING,
                "body": {"round": 1, "global_model_uuid": TRAINING},
            },
            timeout=5,
        )
        notification = receiver.queue.get(timeout=5)
    assert response.status_code == 200
    assert notification.type is NotificationType.UPDATE_ROUND_START
    assert notification.round == 1


def test_receiver_rejects_malformed_body_with_400():
    with WebhookReceiver() as receiver:
        response = requests.post(receiver.url, data=b"not json", timeout=5)
        missing_type = requests.post(receiver.url, json={"body": {}}, timeout=5)
        assert receiver.queue.empty()
    assert response.status_code == 400
    assert missing_type.status_code == 400
    assert "notification_type" in json.loads(missing_type.content)["detail"]


def test_receiver_stop_frees_port():
    receiver = WebhookReceiver().start()
    port = receiver.port
    receiver.stop()
    again = WebhookReceiver(port=port).start()
    again.stop()
