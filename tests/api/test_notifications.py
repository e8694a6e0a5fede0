import threading
import time

import pytest
import requests
from django.db import connection
from rest_framework.authtoken.models import Token

from fedserve.notify import NotificationType, feed, send
from tests.factories import client_for, make_training, make_user

URL = "/api/users/myself/notifications/"


def _notify(user, training, round_number):
    return send(
        [user.pk],
        training,
        NotificationType.UPDATE_ROUND_START,
        {"round": round_number, "global_model_uuid": str(training.model_id)},
    )[0]


@pytest.fixture
def puller(db):
    return make_user()


@pytest.fixture
def training(puller):
    return make_training(make_user(), [puller])


@pytest.mark.django_db
def test_feed_requires_authentication():
    response = client_for(None).get(URL)
    assert response.status_code == 401


def test_feed_lists_own_notifications_in_order(puller, training):
    other = make_user()
    first = _notify(puller, training, 1)
    _notify(other, training, 1)
    second = _notify(puller, training, 2)

    response = client_for(puller).get(URL)

    assert response.status_code == 200
    assert response.json() == [
        {
            "seq": first.pk,
            "notification_type": "UPDATE_ROUND_START",
            "training_uuid": str(training.pk),
            "body": {"round": 1, "global_model_uuid": str(training.model_id)},
            "created_at": response.json()[0]["created_at"],
        },
        {
            "seq": second.pk,
            "notification_type": "UPDATE_ROUND_START",
            "training_uuid": str(training.pk),
            "body": {"round": 2, "global_model_uuid": str(training.model_id)},
            "created_at": response.json()[1]["created_at"],
        },
    ]
    assert response.json()[0]["created_at"]


def test_feed_hides_other_users_notifications(puller, training):
    other = make_user()
    _notify(puller, training, 1)

    response = client_for(other).get(URL)

    assert response.status_code == 200
    assert response.json() == []


def test_feed_after_skips_seen(puller, training):
    first = _notify(puller, training, 1)
    second = _notify(puller, training, 2)

    response = client_for(puller).get(URL, {"after": first.pk})

    assert [item["seq"] for item in response.json()] == [second.pk]


def test_feed_pages_are_limited(puller, training):
    for round_number in range(feed.PAGE_SIZE + 5):
        _notify(puller, training, round_number)
    client = client_for(puller)

    page = client.get(URL).json()
    rest = client.get(URL, {"after": page[-1]["seq"]}).json()

    assert len(page) == feed.PAGE_SIZE
    assert [item["body"]["round"] for item in rest] == list(range(100, 105))


def test_feed_lists_client_removed_without_training(puller):
    send([puller.pk], None, NotificationType.CLIENT_REMOVED, {})

    (item,) = client_for(puller).get(URL).json()

    assert item["notification_type"] == "CLIENT_REMOVED"
    assert item["training_uuid"] is None


@pytest.mark.parametrize(
    ("query", "name", "value"),
    [
        ({"after": "-1"}, "after", "'-1'"),
        ({"after": "abc"}, "after", "'abc'"),
        ({"after": "1.5"}, "after", "'1.5'"),
        ({"after": str(2**63)}, "after", repr(str(2**63))),
        ({"wait": "-1"}, "wait", "'-1'"),
        ({"wait": "soon"}, "wait", "'soon'"),
        ({"wait": "nan"}, "wait", "'nan'"),
        ({"wait": "inf"}, "wait", "'inf'"),
    ],
)
def test_feed_invalid_parameter_is_400(puller, query, name, value):
    response = client_for(puller).get(URL, query)

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert f"'{name}'" in detail
    assert value in detail


def test_feed_wait_zero_returns_at_once(puller):
    started = time.monotonic()
    response = client_for(puller).get(URL, {"wait": "0"})
    assert response.status_code == 200
    assert response.json() == []
    assert time.monotonic() - started < 1.0


def test_feed_wait_is_capped(puller, monkeypatch):
    waited = []
    monkeypatch.setattr(
        feed, "wait_for_notifications", lambda user_id, after, wait: waited.append(wait) or []
    )
    response = client_for(puller).get(URL, {"wait": "3600"})
    assert response.status_code == 200
    assert waited == [feed.MAX_WAIT_SECONDS]


@pytest.mark.django_db
def test_feed_schema_documents_parameters():
    schema = client_for(None).get("/api/schema/", {"format": "json"}).json()
    operation = schema["paths"][URL]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"after", "wait"}
    assert set(operation["responses"]) == {"200", "400", "401"}


# Long polling runs against a live server, so that the wait happens in a server thread
# while the test creates notifications.


@pytest.fixture
def live_puller(transactional_db):
    user = make_user()
    training = make_training(make_user(), [user])
    token = Token.objects.get(user=user).key
    return user, training, {"Authorization": f"Token {token}"}


def _poll(live_server, headers, **params):
    started = time.monotonic()
    response = requests.get(live_server.url + URL, params=params, headers=headers, timeout=30)
    return response, time.monotonic() - started


def test_long_poll_returns_existing_at_once(live_server, live_puller):
    user, training, headers = live_puller
    notification = _notify(user, training, 1)

    response, elapsed = _poll(live_server, headers, wait=20)

    assert response.status_code == 200
    assert [item["seq"] for item in response.json()] == [notification.pk]
    assert elapsed < 5


def test_long_poll_times_out_empty(live_server, live_puller):
    user, training, headers = live_puller
    seen = _notify(user, training, 1)

    response, elapsed = _poll(live_server, headers, wait=0.6, after=seen.pk)

    assert response.status_code == 200
    assert response.json() == []
    assert elapsed >= 0.6
    assert elapsed < 5


def test_long_poll_returns_when_notification_arrives(live_server, live_puller):
    user, training, headers = live_puller
    created = []

    def notify_later():
        time.sleep(0.5)
        try:
            created.append(_notify(user, training, 7))
        finally:
            connection.close()

    thread = threading.Thread(target=notify_later)
    thread.start()
    try:
        response, elapsed = _poll(live_server, headers, wait=20)
    finally:
        thread.join()

    assert response.status_code == 200
    assert [item["seq"] for item in response.json()] == [created[0].pk]
    assert 0.5 <= elapsed < 10


def test_wait_closes_connection_only_on_server(transactional_db, monkeypatch):
    user = make_user()
    closes = []
    monkeypatch.setattr(connection, "close", lambda: closes.append(1))

    page = feed.wait_for_notifications(user.pk, 0, 0.6)

    assert page == []
    if connection.vendor == "sqlite":
        assert closes == []
    else:
        assert len(closes) >= 2
