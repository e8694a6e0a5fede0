"""Updates for the wrong round: stale, future, duplicate, or outside an update phase."""

from __future__ import annotations

import io

import pytest
import torch

from fedserve.core.models import Model, ModelKind, RoundPhase, TrainingState
from tests.api.test_models_updates import tiny_state
from tests.factories import client_for, state_dict_bytes

pytestmark = pytest.mark.django_db


def update_body(round_number: int) -> dict:
    file = io.BytesIO(state_dict_bytes(tiny_state()))
    file.name = "update.pt"
    return {"round": round_number, "sample_size": 5, "model_file": file}


def moments_body(round_number: int) -> dict:
    files = []
    for _ in range(2):
        buffer = io.BytesIO()
        torch.save(torch.zeros(4 * 8 + 8 + 8 * 3 + 3), buffer)
        buffer.seek(0)
        buffer.name = "moment.pt"
        files.append(buffer)
    return {
        "round": round_number,
        "sample_size": 5,
        "first_moment_file": files[0],
        "second_moment_file": files[1],
    }


@pytest.mark.parametrize(("sent", "label"), [(1, "stale"), (3, "future"), (0, "first")])
def test_update_wrong_round_is_400(world, unchanged, round_hooks, sent, label):
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/", update_body(sent), format="multipart"
    )

    assert response.status_code == 400, label
    assert (
        f"is in round 2, not {sent}; train on the current model and send round=2"
        in (response.json()["round"][0])
    )
    assert round_hooks == []
    unchanged()


def test_update_duplicate_is_409_and_keeps_first(
    world, unchanged, round_hooks, django_capture_on_commit_callbacks
):
    url = f"/api/models/{world.model.pk}/"
    with django_capture_on_commit_callbacks(execute=True):
        first = client_for(world.participant).post(url, update_body(2), format="multipart")
    assert first.status_code == 201
    unchanged()

    with django_capture_on_commit_callbacks(execute=True):
        second = client_for(world.participant).post(url, update_body(2), format="multipart")

    assert second.status_code == 409
    assert "already sent an update" in second.json()["detail"]
    assert "round 2" in second.json()["detail"]
    assert Model.objects.filter(kind=ModelKind.LOCAL).count() == 1
    assert len(round_hooks) == 1
    unchanged()


@pytest.mark.parametrize(
    ("state", "phase", "fragment"),
    [
        (TrainingState.INITIAL, RoundPhase.NONE, "state 'I'"),
        (TrainingState.COMPLETED, RoundPhase.NONE, "state 'C'"),
        (TrainingState.ERROR, RoundPhase.NONE, "state 'E'"),
        (TrainingState.ONGOING, RoundPhase.MODEL_TEST, "MODEL_TEST"),
    ],
)
def test_update_outside_update_phase_is_rejected(
    world, unchanged, round_hooks, state, phase, fragment
):
    world.training.state = state
    world.training.phase = phase
    world.training.save()
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/", update_body(2), format="multipart"
    )

    assert response.status_code in (400, 409)
    assert fragment in response.json()["detail"]
    assert round_hooks == []
    unchanged()


@pytest.fixture
def swag_world(world):
    world.training.state = TrainingState.SWAG_ROUND
    world.training.phase = RoundPhase.SWAG
    world.training.save()
    return world


@pytest.mark.parametrize("sent", [1, 3])
def test_swag_wrong_round_is_400(swag_world, unchanged, round_hooks, sent):
    unchanged()

    response = client_for(swag_world.participant).post(
        f"/api/models/{swag_world.model.pk}/swag/", moments_body(sent), format="multipart"
    )

    assert response.status_code == 400
    assert f"not {sent}" in response.json()["round"][0]
    assert round_hooks == []
    unchanged()


def test_swag_duplicate_is_409(
    swag_world, unchanged, round_hooks, django_capture_on_commit_callbacks
):
    url = f"/api/models/{swag_world.model.pk}/swag/"
    participant = client_for(swag_world.participant)
    with django_capture_on_commit_callbacks(execute=True):
        first = participant.post(url, moments_body(2), format="multipart")
    assert first.status_code == 201, first.content
    unchanged()

    with django_capture_on_commit_callbacks(execute=True):
        second = participant.post(url, moments_body(2), format="multipart")

    assert second.status_code == 409
    assert "round 2" in second.json()["detail"]
    assert len(round_hooks) == 1
    unchanged()
