"""Strings of one mebibyte where a short name is expected: 400 naming the field and its limit."""

from __future__ import annotations

import io

import pytest
from rest_framework.test import APIClient

from fedserve.core.models import Model
from tests.factories import client_for, torchscript_bytes

pytestmark = pytest.mark.django_db

MEBIBYTE = "x" * 1024 * 1024


def model_file():
    upload = io.BytesIO(torchscript_bytes())
    upload.name = "m.pt"
    return upload


@pytest.mark.parametrize(
    ("field", "limit"),
    [("username", 150), ("first_name", 150), ("email", 254), ("message_endpoint", 2048)],
)
def test_registration_long_field_is_400(world, unchanged, field, limit):
    body = {"username": "newcomer", "password": "a-long-password", field: MEBIBYTE}
    unchanged()

    response = APIClient().post("/api/users/", body, format="json")

    assert response.status_code == 400
    assert f"no more than {limit} characters" in response.json()[field][0]
    unchanged()


def test_group_long_name_is_400(world, unchanged):
    unchanged()

    response = client_for(world.actor).post("/api/groups/", {"name": MEBIBYTE}, format="json")

    assert response.status_code == 400
    assert "no more than 150 characters" in response.json()["name"][0]
    unchanged()


def test_model_long_name_is_400(world, unchanged):
    unchanged()

    response = client_for(world.actor).post(
        "/api/models/",
        {"name": MEBIBYTE, "description": "d", "model_file": model_file()},
        format="multipart",
    )

    assert response.status_code == 400
    assert "no more than 256 characters" in response.json()["name"][0]
    unchanged()


def test_model_long_description_is_stored(world):
    # A description is free text; the form-field limit below bounds it.
    response = client_for(world.actor).post(
        "/api/models/",
        {"name": "n", "description": MEBIBYTE, "model_file": model_file()},
        format="multipart",
    )

    assert response.status_code == 201
    assert Model.objects.get(pk=response.json()["model_id"]).description == MEBIBYTE


def test_form_fields_over_limit_are_413(world, unchanged, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 512 * 1024
    unchanged()

    response = client_for(world.actor).post(
        "/api/models/",
        {"name": "n", "description": MEBIBYTE, "model_file": model_file()},
        format="multipart",
    )

    assert response.status_code == 413
    assert "form fields are larger than 524288 bytes" in response.json()["detail"]
    unchanged()


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({"metric_names": [MEBIBYTE], "metric_values": [1.0]}, "metric_names", 256),
        ({"metric_names": ["acc"], "metric_values": [MEBIBYTE]}, "metric_values", 10_000),
    ],
)
def test_metric_long_strings_are_400(world, unchanged, body, field, limit):
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/metrics/", body, format="json"
    )

    assert response.status_code == 400
    assert f"no more than {limit} characters" in response.json()[field]["0"][0]
    unchanged()


def test_training_long_metric_name_is_400(world, unchanged):
    body = {
        "model_id": str(world.model.pk),
        "target_num_updates": 1,
        "aggregation_method": "FedAvg",
        "metric_names": [MEBIBYTE],
    }
    unchanged()

    response = client_for(world.actor).post("/api/trainings/", body, format="json")

    assert response.status_code == 400
    assert "no more than 256 characters" in response.json()["metric_names"]["0"][0]
    unchanged()


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/trainings/", {"model_id": MEBIBYTE}, "model_id"),
        ("/api/trainings/", {"clients": [MEBIBYTE]}, "clients"),
    ],
)
def test_long_id_short_message(world, unchanged, url, body, field):
    defaults = {
        "model_id": str(world.model.pk),
        "target_num_updates": 1,
        "aggregation_method": "FedAvg",
    }
    unchanged()

    response = client_for(world.actor).post(url, {**defaults, **body}, format="json")

    assert response.status_code == 400
    message = str(response.json()[field])
    assert "is not a valid UUID" in message
    assert "(1048578 characters)" in message
    assert len(message) < 500
    unchanged()


@pytest.mark.parametrize("name", ["after", "wait"])
def test_long_query_value_short_message(world, name):
    response = client_for(world.participant).get(
        "/api/users/myself/notifications/", {name: MEBIBYTE}
    )

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert f"Query parameter '{name}'" in detail
    assert len(detail) < 500


def test_long_token_is_401(world, unchanged):
    unchanged()

    response = APIClient().get("/api/users/myself/", HTTP_AUTHORIZATION=f"Token {MEBIBYTE}")

    assert response.status_code == 401
    assert response.json()["detail"] == "Invalid token."
    unchanged()


@pytest.mark.parametrize(
    "options",
    [{MEBIBYTE: 1}, {"mu": MEBIBYTE}, {"daisy_chain_period": MEBIBYTE}, MEBIBYTE],
    ids=["option name", "number option", "integer option", "not an object"],
)
def test_long_option_short_message(world, unchanged, options):
    body = {
        "model_id": str(world.model.pk),
        "target_num_updates": 1,
        "aggregation_method": "FedAvg",
        "options": options,
    }
    unchanged()

    response = client_for(world.actor).post("/api/trainings/", body, format="json")

    assert response.status_code == 400
    message = response.json()["options"][0]
    assert "options" in message
    assert "xxx" in message
    assert len(message) < 500
    unchanged()


def test_long_inference_model_id_short_message(world, unchanged):
    unchanged()

    response = client_for(world.actor).post(
        "/api/inference/", {"model_id": MEBIBYTE, "model_input": [[1, 2, 3, 4]]}, format="json"
    )

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "model_id 'xxx" in detail
    assert "is not a valid UUID" in detail
    assert len(detail) < 500
    unchanged()
