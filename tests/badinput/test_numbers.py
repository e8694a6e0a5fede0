"""Numbers out of range: zero, negative, beyond the database columns, NaN and infinity."""

from __future__ import annotations

import io
import json

import pytest
import torch

from fedserve.core.models import RoundPhase, Training, TrainingState
from tests.api.test_models_updates import tiny_state
from tests.factories import client_for, state_dict_bytes

pytestmark = pytest.mark.django_db

HUGE = str(2**70)


def update_form(world, **fields):
    body = {
        "round": world.model.round,
        "sample_size": 10,
        "model_file": io.BytesIO(state_dict_bytes(tiny_state())),
        **fields,
    }
    body["model_file"].name = "update.pt"
    return body


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"sample_size": "0"}, "sample_size", "greater than or equal to 1"),
        ({"sample_size": "-5"}, "sample_size", "greater than or equal to 1"),
        ({"sample_size": HUGE}, "sample_size", "less than or equal to"),
        ({"sample_size": "2.5"}, "sample_size", "valid integer"),
        ({"sample_size": "NaN"}, "sample_size", "valid integer"),
        ({"sample_size": "Infinity"}, "sample_size", "valid integer"),
        ({"round": "-1"}, "round", "greater than or equal to 0"),
        ({"round": HUGE}, "round", "less than or equal to"),
    ],
)
def test_update_number_rejected(world, unchanged, fields, field, fragment):
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/", update_form(world, **fields), format="multipart"
    )

    assert response.status_code == 400
    assert fragment in response.json()[field][0]
    unchanged()


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"sample_size": "0"}, "sample_size", "greater than or equal to 1"),
        ({"sample_size": HUGE}, "sample_size", "less than or equal to"),
        ({"round": HUGE}, "round", "less than or equal to"),
    ],
)
def test_swag_number_rejected(world, unchanged, fields, field, fragment):
    world.training.state = TrainingState.SWAG_ROUND
    world.training.phase = RoundPhase.SWAG
    world.training.save()
    moment = io.BytesIO(state_dict_bytes({"m": torch.zeros(3)}))
    moment.name = "m.pt"
    body = {
        "round": 2,
        "sample_size": 1,
        "first_moment_file": moment,
        "second_moment_file": moment,
        **fields,
    }
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/swag/", body, format="multipart"
    )

    assert response.status_code == 400
    assert fragment in response.json()[field][0]
    unchanged()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(0, "greater than or equal to 1"), (-1, "greater than or equal to 1"), (2**70, "less than")],
)
def test_training_target_rejected(world, unchanged, value, fragment):
    body = {
        "model_id": str(world.model.pk),
        "target_num_updates": value,
        "aggregation_method": "FedAvg",
    }
    unchanged()

    response = client_for(world.actor).post("/api/trainings/", body, format="json")

    assert response.status_code == 400
    assert fragment in response.json()["target_num_updates"][0]
    unchanged()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ('{"mu": "NaN"}', "options.mu"),
        ('{"round_timeout_seconds": -1}', "options.round_timeout_seconds"),
        ('{"round_timeout_seconds": 1e999}', "options"),
        ('{"daisy_chain_period": 0}', "options.daisy_chain_period"),
        ('{"uncertainty": {"N": 100000}}', "options.uncertainty.N"),
    ],
)
def test_training_option_rejected(world, unchanged, options, fragment):
    body = (
        f'{{"model_id": "{world.model.pk}", "target_num_updates": 1, '
        f'"aggregation_method": "FedAvg", "options": {options}}}'
    )
    unchanged()

    response = client_for(world.actor).post(
        "/api/trainings/", body, content_type="application/json"
    )

    assert response.status_code == 400
    assert fragment in json.dumps(response.json())
    unchanged()


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_training_non_finite_json_token_rejected(world, unchanged, token):
    # Python's JSON parser would read these tokens; JSON has no such numbers, so DRF rejects them.
    body = (
        f'{{"model_id": "{world.model.pk}", "target_num_updates": 1, '
        f'"aggregation_method": "FedAvg", "options": {{"mu": {token}}}}}'
    )
    unchanged()

    response = client_for(world.actor).post(
        "/api/trainings/", body, content_type="application/json"
    )

    assert response.status_code == 400
    assert f"not JSON compliant: '{token}'" in response.json()["detail"]
    unchanged()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_inference_non_finite_input_rejected(world, unchanged, value):
    body = f'{{"model_id": "{world.model.pk}", "model_input": [[1.0, 2.0, {value}, 0.5]]}}'
    unchanged()

    response = client_for(world.actor).post(
        "/api/inference/", body, content_type="application/json"
    )

    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]
    assert "column" in response.json()["detail"]
    unchanged()


@pytest.mark.parametrize("after", [HUGE, "-1", "1e3", "NaN"])
def test_feed_after_out_of_range(world, after):
    response = client_for(world.participant).get(
        "/api/users/myself/notifications/", {"after": after}
    )
    assert response.status_code == 400
    assert repr(after) in response.json()["detail"]


def test_group_id_beyond_integer_column_is_404(world, unchanged):
    unchanged()
    response = client_for(world.actor).get(f"/api/groups/{HUGE}/")
    assert response.status_code == 404
    response = client_for(world.actor).delete(f"/api/groups/{HUGE}/")
    assert response.status_code == 404
    unchanged()
    assert Training.objects.count() == 1
