"""Registration grants no privileges, and message endpoints are http or https URLs only."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from fedserve.core.models import User
from fedserve.notify.webhook import endpoint_problem

pytestmark = pytest.mark.django_db

PRIVILEGED_FIELDS = {
    "is_staff": True,
    "is_superuser": True,
    "is_active": False,
    "groups": [1],
    "user_permissions": [1],
    "id": "00000000-0000-4000-8000-000000000001",
    "token": "0123456789abcdef0123456789abcdef01234567",
    "last_login": "2020-01-01T00:00:00Z",
    "date_joined": "2020-01-01T00:00:00Z",
}


@pytest.mark.parametrize("body_format", ["json", "multipart"])
def test_registration_ignores_privileged_fields(body_format):
    body = {"username": "mallory", "password": "a-long-password", **PRIVILEGED_FIELDS}
    if body_format == "multipart":
        body = {name: value for name, value in body.items() if not isinstance(value, list)}

    response = APIClient().post("/api/users/", body, format=body_format)

    assert response.status_code == 201
    user = User.objects.get(username="mallory")
    assert user.is_staff is False
    assert user.is_superuser is False
    assert user.is_active is True
    assert list(user.groups.all()) == []
    assert list(user.user_permissions.all()) == []
    assert str(user.pk) != PRIVILEGED_FIELDS["id"]
    assert response.json()["token"] != PRIVILEGED_FIELDS["token"]
    assert user.last_login is None


def test_registered_user_cannot_use_admin():
    APIClient().post(
        "/api/users/", {"username": "mallory", "password": "a-long-password"}, format="json"
    )
    client = APIClient()
    assert client.login(username="mallory", password="a-long-password")

    response = client.get("/admin/")

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://127.0.0.1/inbox",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "data:text/plain,hello",
        "ws://127.0.0.1:9000/hook",
        "127.0.0.1:9000/hook",
        "//127.0.0.1/hook",
        "http://",
        "http:///hook",
        "http://127.0.0.1:99999/hook",
        "http://[::1/hook",
    ],
)
def test_message_endpoint_rejects_non_http(endpoint):
    response = APIClient().post(
        "/api/users/",
        {"username": "hooked", "password": "a-long-password", "message_endpoint": endpoint},
        format="json",
    )

    assert response.status_code == 400
    assert "message_endpoint" in response.json()
    assert not User.objects.filter(username="hooked").exists()


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9000/hook",
        "https://127.0.0.1/hook?token=abc",
        "HTTP://127.0.0.1:9000/upper",
        "http://127.0.0.1:8080/",
    ],
)
def test_message_endpoint_accepts_http_urls(endpoint):
    response = APIClient().post(
        "/api/users/",
        {"username": "hooked", "password": "a-long-password", "message_endpoint": endpoint},
        format="json",
    )

    assert response.status_code == 201
    # Whatever registration accepts, webhook delivery can contact.
    assert endpoint_problem(User.objects.get(username="hooked").message_endpoint) is None
