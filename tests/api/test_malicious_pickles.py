"""A torch.save file whose unpickling runs code is rejected on every upload path, unrun."""

from __future__ import annotations

import io
import pathlib

import pytest
import torch
from django.core.files.base import ContentFile

from fedserve.core.models import Model, ModelKind, RoundPhase, SwagStatistic, TrainingState
from tests.factories import client_for, make_global_model, make_training, make_user
from tests.factories import torchscript_bytes as make_torchscript

pytestmark = pytest.mark.django_db

PARAMETER_COUNT = 4 * 8 + 8 + 8 * 3 + 3


class TouchMarker:
    """Unpickling this object creates a file, standing in for any code an attacker could run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def malicious_file(marker: pathlib.Path, name: str) -> ContentFile:
    buffer = io.BytesIO()
    torch.save({"fc1.weight": TouchMarker(marker)}, buffer)
    return ContentFile(buffer.getvalue(), name=name)


def tensor_file(tensor: torch.Tensor, name: str) -> ContentFile:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return ContentFile(buffer.getvalue(), name=name)


@pytest.fixture
def world(model_store):
    actor, participant = make_user(), make_user()
    model = make_global_model(actor, kind=ModelKind.SWAG)
    training = make_training(
        actor, [participant], model=model, state=TrainingState.ONGOING, phase=RoundPhase.UPDATE
    )
    return training, actor, participant


def upload_paths(training, actor, participant, marker):
    """(caller, URL, multipart body, field with the malicious file) for every upload path."""
    model = training.model
    zeros = torch.zeros(PARAMETER_COUNT)
    return [
        (
            actor,
            "/api/models/",
            {"name": "m", "description": "", "model_file": malicious_file(marker, "m.pt")},
            "model_file",
        ),
        (
            actor,
            "/api/models/",
            {
                "name": "m",
                "description": "",
                "model_file": ContentFile(make_torchscript(), name="m.pt"),
                "model_preprocessing_file": malicious_file(marker, "p.pt"),
            },
            "model_preprocessing_file",
        ),
        (
            actor,
            f"/api/models/{model.pk}/preprocessing/",
            {"model_preprocessing_file": malicious_file(marker, "p.pt")},
            "model_preprocessing_file",
        ),
        (
            participant,
            f"/api/models/{model.pk}/",
            {"round": 0, "sample_size": 3, "model_file": malicious_file(marker, "u.pt")},
            "model_file",
        ),
        (
            participant,
            f"/api/models/{model.pk}/swag/",
            {
                "round": 0,
                "sample_size": 3,
                "first_moment_file": malicious_file(marker, "first.pt"),
                "second_moment_file": tensor_file(zeros, "second.pt"),
            },
            "first_moment_file",
        ),
        (
            participant,
            f"/api/models/{model.pk}/swag/",
            {
                "round": 0,
                "sample_size": 3,
                "first_moment_file": tensor_file(zeros, "first.pt"),
                "second_moment_file": malicious_file(marker, "second.pt"),
            },
            "second_moment_file",
        ),
    ]


def send_all(paths, training):
    responses = []
    for caller, url, body, field in paths:
        if "swag" in url:
            training.state, training.phase = TrainingState.SWAG_ROUND, RoundPhase.SWAG
            training.save()
        responses.append((url, field, client_for(caller).post(url, body, format="multipart")))
    return responses


def test_malicious_pickle_rejected_everywhere(world, tmp_path, settings):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = False
    training, actor, participant = world
    marker = tmp_path / "marker"
    models_before = set(Model.objects.values_list("pk", flat=True))

    responses = send_all(upload_paths(training, actor, participant, marker), training)

    assert len(responses) == 6
    for url, field, response in responses:
        assert response.status_code == 400, (url, field, response.content)
        message = response.json()[field][0]
        assert "Accepted formats: a TorchScript archive" in message, (url, field)
        assert "does not unpickle" in message, (url, field)
    assert not marker.exists()
    assert set(Model.objects.values_list("pk", flat=True)) == models_before
    assert not SwagStatistic.objects.exists()


def test_swag_moments_never_unpickled_even_when_enabled(world, tmp_path, settings):
    # The option admits whole pickled modules as models; moments are always plain tensors.
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    training, actor, participant = world
    marker = tmp_path / "marker"
    swag_paths = [p for p in upload_paths(training, actor, participant, marker) if "swag" in p[1]]

    responses = send_all(swag_paths, training)

    for url, field, response in responses:
        assert response.status_code == 400, (url, field, response.content)
        assert "does not unpickle" in response.json()[field][0]
    assert not marker.exists()
