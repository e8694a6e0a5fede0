"""Passwords and tokens never reach the logs, nor the responses other users receive."""

from __future__ import annotations

import base64
import logging

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fedserve.core.models import User
from tests.factories import client_for, make_global_model, make_training, make_user

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery-staple-7391"
WRONG_PASSWORD = "wrong-horse-battery-staple-1937"


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def test_logs_never_contain_secrets(caplog):
    caplog.set_level(logging.DEBUG)
    anonymous = APIClient()

    registered = anonymous.post(
        "/api/users/",
        {"username": "alice", "password": PASSWORD, "message_endpoint": "http://127.0.0.1:9/h"},
        format="json",
    )
    token = registered.json()["token"]
    requests = [
        ("Token", f"Token {token}"),
        ("Basic password", basic("alice", PASSWORD)),
        ("Basic token", basic(token, "")),
        ("failed Basic login", basic("alice", WRONG_PASSWORD)),
        ("failed token", f"Token {token[::-1]}"),
    ]
    statuses = {
        label: APIClient().get("/api/users/myself/", HTTP_AUTHORIZATION=header).status_code
        for label, header in requests
    }
    # A registration that fails validation is logged as a client error.
    rejected = anonymous.post(
        "/api/users/", {"username": "alice", "password": PASSWORD}, format="json"
    )

    assert registered.status_code == 201
    assert statuses == {
        "Token": 200,
        "Basic password": 200,
        "Basic token": 200,
        "failed Basic login": 401,
        "failed token": 401,
    }
    assert rejected.status_code == 400
    assert "/api/users/" in caplog.text
    for secret in (PASSWORD, WRONG_PASSWORD, token, token[::-1]):
        assert secret not in caplog.text
    encoded = [header.split(" ", 1)[1] for _label, header in requests]
    for credential in encoded:
        assert credential not in caplog.text


def test_other_users_responses_carry_no_secrets():
    actor = make_user(password=PASSWORD)
    participant = make_user()
    model = make_global_model(actor)
    training = make_training(actor, [participant], model=model)
    actor_token = Token.objects.get(user=actor).key
    password_hash = User.objects.get(pk=actor.pk).password
    reader = client_for(participant)
    urls = [
        "/api/users/",
        f"/api/users/{actor.pk}/",
        "/api/users/myself/",
        "/api/users/trainings/",
        "/api/users/myself/notifications/",
        "/api/models/",
        f"/api/models/{model.pk}/metadata/",
        f"/api/models/{model.pk}/metrics/",
        f"/api/trainings/{training.pk}/",
        f"/api/trainings/{training.pk}/models/",
        f"/api/trainings/{training.pk}/models/latest/",
    ]

    for url in urls:
        response = reader.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert actor_token not in body, url
        assert PASSWORD not in body, url
        assert password_hash not in body, url
        assert '"password"' not in body, url


def test_own_token_only_in_own_records():
    caller = make_user()
    others = [make_user() for _ in range(3)]

    listed = client_for(caller).get("/api/users/").json()

    tokens = {row["id"]: row.get("token") for row in listed}
    assert tokens[str(caller.pk)] == Token.objects.get(user=caller).key
    for other in others:
        assert tokens[str(other.pk)] is None
