"""Metric names and values that do not pair up, in local updates and metric uploads."""

from __future__ import annotations

import io

import pytest

from tests.api.test_models_updates import tiny_state
from tests.factories import client_for, state_dict_bytes

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("metrics", "names", "values"),
    [
        ({"metric_names": ["acc"], "metric_values": ["0.9", "0.1"]}, 1, 2),
        ({"metric_names": ["acc", "loss"], "metric_values": ["0.9"]}, 2, 1),
        ({"metric_names": ["acc"]}, 1, 0),
        ({"metric_values": ["0.9"]}, 0, 1),
    ],
)
def test_update_metric_lengths_differ(world, unchanged, round_hooks, metrics, names, values):
    file = io.BytesIO(state_dict_bytes(tiny_state()))
    file.name = "update.pt"
    body = {"round": 2, "sample_size": 5, "model_file": file, **metrics}
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/", body, format="multipart"
    )

    assert response.status_code == 400
    message = response.json()["metric_values"][0]
    assert f"metric_names has {names} entries and metric_values has {values}" in message
    assert round_hooks == []
    unchanged()


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"metric_names": ["acc"], "metric_values": [0.9, 0.1]}, "metric_values", "has 2"),
        ({"metric_names": "acc", "metric_values": [0.9]}, "metric_names", "list"),
        ({"metric_names": ["acc"], "metric_values": 0.9}, "metric_values", "list"),
        ({"metric_names": [["acc"]], "metric_values": [0.9]}, "metric_names", "valid string"),
        ({"metric_names": [None], "metric_values": [0.9]}, "metric_names", "may not be null"),
        ({"metric_names": ["acc"], "metric_values": [{"v": 1}]}, "metric_values", "valid string"),
    ],
)
def test_metrics_upload_lists_invalid(world, unchanged, round_hooks, body, field, fragment):
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/metrics/", body, format="json"
    )

    assert response.status_code == 400
    assert fragment in str(response.json()[field])
    assert round_hooks == []
    unchanged()
