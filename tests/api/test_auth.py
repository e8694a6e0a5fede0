"""Authentication: token header, Basic with password or token, session, and the Basic cache."""

from __future__ import annotations

import base64

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fedserve.api import authentication
from fedserve.core.models import User
from tests.factories import make_user

pytestmark = pytest.mark.django_db

MYSELF = "/api/users/myself/"


@pytest.fixture(autouse=True)
def empty_credential_cache():
    authentication.verified_credentials.clear()
    yield
    authentication.verified_credentials.clear()


@pytest.fixture
def password_checks(monkeypatch):
    """Count calls of Django's authenticate(), which runs the password hasher."""
    calls = []
    real = authentication.authenticate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("username"))
        return real(*args, **kwargs)

    monkeypatch.setattr(authentication, "authenticate", counting)
    return calls


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def get_with(header: str | None, path: str = MYSELF):
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    return client.get(path)


def test_token_header_authenticates():
    user = make_user()

    response = get_with(f"Token {Token.objects.get(user=user).key}")

    assert response.status_code == 200
    assert response.json()["id"] == str(user.pk)


def test_bearer_header_authenticates():
    user = make_user()

    response = get_with(f"Bearer {Token.objects.get(user=user).key}")

    assert response.status_code == 200
    assert response.json()["id"] == str(user.pk)


def test_missing_credentials_is_401_with_challenge():
    response = get_with(None)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize(
    "header",
    [
        "Token 0000000000000000000000000000000000000000",
        "Token",
        "Token a b",
        "Bearer",
        "Bearer a b",
        "Bearer 0000000000000000000000000000000000000000",
        "Token bad\x00key",
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        basic("nobody", "wrong"),
        basic("0000000000000000000000000000000000000000", ""),
        basic("user\x00name", "password"),
    ],
)
def test_wrong_credentials_are_401(header):
    make_user(username="someone")

    response = get_with(header)

    assert response.status_code == 401
    assert "detail" in response.json()
    assert "WWW-Authenticate" in response


def test_inactive_user_token_is_401():
    user = make_user(is_active=False)

    response = get_with(f"Token {Token.objects.get(user=user).key}")

    assert response.status_code == 401


def test_basic_password_authenticates():
    user = make_user(username="alice", password="alice-pass")

    response = get_with(basic("alice", "alice-pass"))

    assert response.status_code == 200
    assert response.json()["id"] == str(user.pk)


def test_basic_wrong_password_is_401():
    make_user(username="alice", password="alice-pass")

    response = get_with(basic("alice", "alice-pas"))

    assert response.status_code == 401
    assert response.json()["detail"] == "Invalid username or password."


def test_basic_token_with_empty_password():
    user = make_user()
    key = Token.objects.get(user=user).key

    response = get_with(basic(key, ""))

    assert response.status_code == 200
    assert response.json()["id"] == str(user.pk)


def test_basic_unknown_token_message_explains():
    response = get_with(basic("0" * 40, ""))

    assert response.status_code == 401
    assert "empty password" in response.json()["detail"]


def test_basic_cache_skips_password_hash(password_checks):
    make_user(username="alice", password="alice-pass")

    statuses = [get_with(basic("alice", "alice-pass")).status_code for _ in range(3)]

    assert statuses == [200, 200, 200]
    assert password_checks == ["alice"]


def test_basic_cache_never_accepts_wrong_password(password_checks):
    make_user(username="alice", password="alice-pass")
    assert get_with(basic("alice", "alice-pass")).status_code == 200

    response = get_with(basic("alice", "other"))

    assert response.status_code == 401
    assert password_checks == ["alice", "alice"]


def test_basic_cache_off_checks_every_time(settings, password_checks):
    settings.FEDSERVE_BASIC_AUTH_CACHE_SECONDS = 0
    make_user(username="alice", password="alice-pass")

    for _ in range(2):
        assert get_with(basic("alice", "alice-pass")).status_code == 200

    assert password_checks == ["alice", "alice"]


def test_password_change_invalidates_cache():
    user = make_user(username="alice", password="old-pass")
    assert get_with(basic("alice", "old-pass")).status_code == 200

    user.set_password("new-pass")
    user.save()

    assert get_with(basic("alice", "old-pass")).status_code == 401
    assert get_with(basic("alice", "new-pass")).status_code == 200


def test_rename_invalidates_cache():
    user = make_user(username="alice", password="alice-pass")
    assert get_with(basic("alice", "alice-pass")).status_code == 200

    user.username = "alicia"
    user.save()

    assert get_with(basic("alice", "alice-pass")).status_code == 401
    assert get_with(basic("alicia", "alice-pass")).status_code == 200


def test_deactivation_invalidates_cache():
    user = make_user(username="alice", password="alice-pass")
    assert get_with(basic("alice", "alice-pass")).status_code == 200

    User.objects.filter(pk=user.pk).update(is_active=False)

    assert get_with(basic("alice", "alice-pass")).status_code == 401


def test_cache_stores_no_password():
    make_user(username="alice", password="alice-pass")
    get_with(basic("alice", "alice-pass"))

    entries = authentication.verified_credentials._entries
    assert len(entries) == 1
    ((key, (_user_id, password_hash, _expires)),) = entries.items()
    assert b"alice-pass" not in key
    assert "alice-pass" not in password_hash


def test_session_authenticates_reads():
    user = make_user(username="alice", password="alice-pass")
    client = APIClient()
    assert client.login(username="alice", password="alice-pass")

    response = client.get(MYSELF)

    assert response.status_code == 200
    assert response.json()["id"] == str(user.pk)


def test_session_write_needs_csrf_token():
    make_user(username="alice", password="alice-pass")
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password="alice-pass")

    response = client.post("/api/groups/", {"name": "lab"}, format="json")

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
