"""Local updates (POST models/<id>/) and SWAG moments (POST models/<id>/swag/)."""

# The fixtures `hooks` and `temp_dir` are imported from test_models and used as arguments.
# ruff: noqa: F811

from __future__ import annotations

import io

import pytest
import safetensors.torch
import torch
from django.core.files.base import ContentFile
from django.db import IntegrityError

from fedserve import modelfiles, modelstore
from fedserve.api.views import model_swag, model_updates
from fedserve.core.models import (
    Metric,
    Model,
    ModelKind,
    RoundPhase,
    SwagStatistic,
    TrainingState,
    UncertaintyMethod,
)
from tests.api.test_models import hooks, stored_files, temp_dir, upload_file  # noqa: F401
from tests.factories import (
    TinyNet,
    client_for,
    make_global_model,
    make_training,
    make_user,
    state_dict_bytes,
    torchscript_bytes,
)

pytestmark = pytest.mark.django_db

PARAMETER_COUNT = 4 * 8 + 8 + 8 * 3 + 3


@pytest.fixture
def update_round(model_store):
    """A training of a TinyNet in round 2, waiting for local updates from two participants."""
    actor, participant, other = make_user(), make_user(), make_user()
    model = make_global_model(actor, round=2)
    training = make_training(
        actor,
        [participant, other],
        model=model,
        state=TrainingState.ONGOING,
        phase=RoundPhase.UPDATE,
    )
    return training, participant


def post_update(user, model, content, **fields):
    body = {"round": model.round, "sample_size": 10, "model_file": upload_file(content), **fields}
    return client_for(user).post(f"/api/models/{model.pk}/", body, format="multipart")


def tiny_state() -> dict[str, torch.Tensor]:
    return dict(TinyNet().state_dict())


# Local updates


def test_update_state_dict_stored_as_uploaded(
    update_round, hooks, temp_dir, model_store, django_capture_on_commit_callbacks
):
    training, participant = update_round
    model = training.model
    content = state_dict_bytes(tiny_state())

    with django_capture_on_commit_callbacks(execute=True):
        response = post_update(
            participant,
            model,
            content,
            metric_names=["loss", "accuracy"],
            metric_values=["0.3", "0.8"],
        )

    assert response.status_code == 201, response.content
    assert response.json() == {"detail": "Model Update Accepted"}
    local = Model.objects.get(kind=ModelKind.LOCAL)
    assert local.owner == participant
    assert local.base_model == model
    assert local.round == 2
    assert local.sample_size == 10
    assert local.weights_format == "state_dict"
    assert (model_store / local.weights_path).read_bytes() == content
    metrics = list(Metric.objects.filter(model=local).values_list("key", "value_float", "step"))
    assert metrics == [("loss", 0.3, 2), ("accuracy", 0.8, 2)]
    assert hooks == [("local_model_uploaded", local)]
    assert stored_files(temp_dir) == []


@pytest.mark.parametrize("kind", ["torchscript", "safetensors"])
def test_update_converted_to_state_dict(update_round, hooks, model_store, kind):
    training, participant = update_round
    module = TinyNet()
    if kind == "torchscript":
        content = torchscript_bytes(module)
    else:
        content = safetensors.torch.save(
            {k: v.contiguous() for k, v in module.state_dict().items()}
        )

    response = post_update(participant, training.model, content)

    assert response.status_code == 201, response.content
    local = Model.objects.get(kind=ModelKind.LOCAL)
    stored = torch.load(model_store / local.weights_path, weights_only=True)
    assert set(stored) == set(module.state_dict())
    assert torch.equal(stored["fc1.weight"], module.fc1.weight)


def test_update_torchscript_rejected_when_weights_only(update_round, hooks, settings):
    settings.FEDSERVE_WEIGHTS_ONLY_UPDATES = True
    training, participant = update_round

    response = post_update(participant, training.model, torchscript_bytes())

    assert response.status_code == 400
    assert "FEDSERVE_WEIGHTS_ONLY_UPDATES" in response.json()["model_file"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("fc2.bias"), "missing keys 'fc2.bias'"),
        (lambda s: s.update({"extra": torch.ones(1)}), "unexpected keys 'extra'"),
        (lambda s: s.update({"fc1.weight": torch.zeros(8, 5)}), "'fc1.weight' has shape [8, 5]"),
        (
            lambda s: s.update({"fc1.bias": torch.zeros(8, dtype=torch.float64)}),
            "'fc1.bias' has dtype torch.float64",
        ),
        (
            lambda s: s.update({"fc2.weight": torch.full((3, 8), float("nan"))}),
            "'fc2.weight' contains NaN values; send finite weights",
        ),
        (
            lambda s: s.update({"fc2.bias": torch.tensor([0.0, float("-inf"), 1.0])}),
            "'fc2.bias' contains infinite values",
        ),
    ],
)
def test_update_rejects_mismatched_weights(update_round, hooks, temp_dir, change, message):
    training, participant = update_round
    state = tiny_state()
    change(state)

    response = post_update(participant, training.model, state_dict_bytes(state))

    assert response.status_code == 400
    assert message in response.json()["model_file"][0]
    assert not Model.objects.filter(kind=ModelKind.LOCAL).exists()
    assert stored_files(temp_dir) == []
    assert hooks == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"sample_size": "0"}, "sample_size"),
        ({"sample_size": "-3"}, "sample_size"),
        ({"sample_size": "many"}, "sample_size"),
        ({"round": "two"}, "round"),
        ({"round": "7"}, "round"),
        ({"metric_names": ["a", "b"], "metric_values": ["1"]}, "metric_values"),
    ],
)
def test_update_rejects_invalid_fields(update_round, hooks, model_store, fields, field):
    training, participant = update_round

    response = post_update(participant, training.model, state_dict_bytes(tiny_state()), **fields)

    assert response.status_code == 400
    assert field in response.json()
    assert not Model.objects.filter(kind=ModelKind.LOCAL).exists()
    assert not Metric.objects.exists()
    assert [p for p in stored_files(model_store) if "weights" in p] == [training.model.weights_path]


def test_update_requires_model_file(update_round, hooks):
    training, participant = update_round
    response = client_for(participant).post(
        f"/api/models/{training.model.pk}/", {"round": 2, "sample_size": 1}, format="multipart"
    )
    assert response.status_code == 400
    assert "model_file" in response.json()


@pytest.mark.parametrize(
    ("state", "phase"),
    [
        (TrainingState.INITIAL, RoundPhase.NONE),
        (TrainingState.ONGOING, RoundPhase.MODEL_TEST),
        (TrainingState.SWAG_ROUND, RoundPhase.SWAG),
        (TrainingState.COMPLETED, RoundPhase.NONE),
    ],
)
def test_update_rejected_outside_update_phase(update_round, hooks, state, phase):
    training, participant = update_round
    training.state, training.phase = state, phase
    training.save()

    response = post_update(participant, training.model, state_dict_bytes(tiny_state()))

    assert response.status_code == 400
    assert "does not accept local updates" in response.json()["detail"]


def test_update_accepted_in_daisy_chain_phase(update_round, hooks):
    training, participant = update_round
    training.phase = RoundPhase.DAISY_CHAIN
    training.save()

    response = post_update(participant, training.model, state_dict_bytes(tiny_state()))

    assert response.status_code == 201


def test_update_second_for_round_is_409(update_round, hooks, model_store):
    training, participant = update_round
    content = state_dict_bytes(tiny_state())

    assert post_update(participant, training.model, content).status_code == 201
    response = post_update(participant, training.model, content)

    assert response.status_code == 409
    assert "already sent an update" in response.json()["detail"]
    assert Model.objects.filter(kind=ModelKind.LOCAL).count() == 1


def test_update_race_on_unique_constraint_is_409(update_round, hooks, model_store, monkeypatch):
    training, participant = update_round
    content = state_dict_bytes(tiny_state())
    assert post_update(participant, training.model, content).status_code == 201
    files_before = stored_files(model_store)
    # As if a concurrent request inserted its row after this one's duplicate check.
    monkeypatch.setattr(model_updates, "_has_update", lambda *args: False)

    response = post_update(participant, training.model, content)

    assert response.status_code == 409
    assert stored_files(model_store) == files_before


def test_update_failure_after_store_leaves_nothing(update_round, hooks, model_store, monkeypatch):
    training, participant = update_round

    def fail(*args, **kwargs):
        raise IntegrityError("metric table is broken")

    monkeypatch.setattr(Metric.objects, "bulk_create", fail)
    response = post_update(
        participant,
        training.model,
        state_dict_bytes(tiny_state()),
        metric_names=["a"],
        metric_values=["1"],
    )

    assert response.status_code == 409
    assert not Model.objects.filter(kind=ModelKind.LOCAL).exists()
    assert stored_files(model_store) == [training.model.weights_path]


def test_update_permissions(update_round, hooks):
    training, participant = update_round
    content = state_dict_bytes(tiny_state())

    assert post_update(training.actor, training.model, content).status_code == 403
    assert post_update(make_user(), training.model, content).status_code == 403
    untrained = make_global_model(participant)
    assert post_update(participant, untrained, content).status_code == 403


def test_update_to_peer_local_model_goes_to_global(update_round, hooks, model_store):
    training, participant = update_round
    peer = training.participants.exclude(pk=participant.pk).get()
    content = state_dict_bytes(tiny_state())
    assert post_update(peer, training.model, content).status_code == 201
    peer_local = Model.objects.get(kind=ModelKind.LOCAL, owner=peer)
    training.phase = RoundPhase.DAISY_CHAIN
    training.save()

    response = post_update(participant, peer_local, content)

    assert response.status_code == 201
    stored = Model.objects.get(kind=ModelKind.LOCAL, owner=participant)
    assert stored.base_model_id == training.model_id
    assert stored.round == training.model.round


# SWAG moments


@pytest.fixture
def swag_round(model_store):
    actor, participant = make_user(), make_user()
    model = make_global_model(actor, kind=ModelKind.SWAG, round=3)
    training = make_training(
        actor,
        [participant],
        model=model,
        state=TrainingState.SWAG_ROUND,
        phase=RoundPhase.SWAG,
        uncertainty_method=UncertaintyMethod.SWAG,
    )
    return training, participant


def post_swag(user, model, first, second, **fields):
    body = {
        "round": model.round,
        "sample_size": 5,
        "first_moment_file": upload_file(state_dict_bytes(first), "first.pt"),
        "second_moment_file": upload_file(state_dict_bytes(second), "second.pt"),
        **fields,
    }
    return client_for(user).post(f"/api/models/{model.pk}/swag/", body, format="multipart")


def test_swag_upload_stored(swag_round, hooks, django_capture_on_commit_callbacks):
    training, participant = swag_round
    first, second = torch.zeros(PARAMETER_COUNT), torch.ones(PARAMETER_COUNT)

    with django_capture_on_commit_callbacks(execute=True):
        response = post_swag(participant, training.model, first, second)

    assert response.status_code == 201, response.content
    assert response.json() == {"detail": "SWAG Statistic Accepted"}
    statistic = SwagStatistic.objects.get()
    assert (statistic.owner, statistic.round, statistic.sample_size) == (participant, 3, 5)
    assert statistic.first_moment_path.startswith(f"swag/{statistic.pk}/")
    assert hooks == [("swag_statistic_uploaded", training.model, participant.pk)]


@pytest.mark.parametrize(
    ("first", "second", "field", "message"),
    [
        (torch.zeros(PARAMETER_COUNT - 1), torch.ones(PARAMETER_COUNT), "first", "67 floating"),
        (torch.zeros(1, PARAMETER_COUNT), torch.ones(PARAMETER_COUNT), "first", "2-D"),
        (
            torch.zeros(PARAMETER_COUNT, dtype=torch.int64),
            torch.ones(PARAMETER_COUNT),
            "first",
            "1-D",
        ),
        (
            torch.zeros(PARAMETER_COUNT),
            torch.full((PARAMETER_COUNT,), float("nan")),
            "second",
            "NaN",
        ),
        (torch.zeros(PARAMETER_COUNT), -torch.ones(PARAMETER_COUNT), "second", "negative"),
        (torch.zeros(PARAMETER_COUNT), {"not": torch.ones(2)}, "second", "not a single tensor"),
    ],
)
def test_swag_rejects_invalid_moments(swag_round, hooks, first, second, field, message):
    training, participant = swag_round

    response = post_swag(participant, training.model, first, second)

    assert response.status_code == 400
    assert message in response.json()[f"{field}_moment_file"][0]
    assert not SwagStatistic.objects.exists()


def test_swag_rejected_outside_swag_round(swag_round, hooks):
    training, participant = swag_round
    training.state = TrainingState.ONGOING
    training.save()

    response = post_swag(participant, training.model, torch.zeros(67), torch.ones(67))

    assert response.status_code == 400
    assert "not in a SWAG round" in response.json()["detail"]


def test_swag_wrong_round_and_duplicate(swag_round, hooks, model_store):
    training, participant = swag_round
    moments = (torch.zeros(PARAMETER_COUNT), torch.ones(PARAMETER_COUNT))

    assert post_swag(participant, training.model, *moments, round=2).status_code == 400
    assert post_swag(participant, training.model, *moments).status_code == 201
    duplicate = post_swag(participant, training.model, *moments)

    assert duplicate.status_code == 409
    assert SwagStatistic.objects.count() == 1
    assert len([p for p in stored_files(model_store) if p.startswith("swag/")]) == 2


def test_swag_permissions(swag_round, hooks):
    training, participant = swag_round
    moments = (torch.zeros(PARAMETER_COUNT), torch.ones(PARAMETER_COUNT))

    assert post_swag(training.actor, training.model, *moments).status_code == 403
    missing = client_for(participant).post(
        "/api/models/00000000-0000-4000-8000-000000000000/swag/", {}, format="multipart"
    )
    assert missing.status_code == 404


class SharedWeights(torch.nn.Module):
    """Two layers with one weight, a frozen bias, BatchNorm statistics and an integer parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4)
        self.decoder = torch.nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.decoder.bias.requires_grad_(False)
        self.norm = torch.nn.BatchNorm1d(4)
        self.steps = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.encoder(x))) + self.steps.sum()


def test_swag_length_read_without_loading_model(swag_round, hooks, monkeypatch):
    training, participant = swag_round
    content = torchscript_bytes(SharedWeights())
    training.model.weights_path = modelstore.save(
        modelstore.model_file_path(training.model.pk, "shared.pt"), ContentFile(content)
    )
    training.model.save()
    # module.parameters() lists the shared weight once: 16 + 4 + 4 + 4 + 4 float values.
    length = model_swag.modelfiles.count_float_parameters(torch.jit.load(io.BytesIO(content)))

    def full_load(*args, **kwargs):
        raise AssertionError("the SWAG check loaded the whole global model")

    monkeypatch.setattr(torch.jit, "load", full_load)
    monkeypatch.setattr(model_swag.modelfiles, "load_module", full_load)
    monkeypatch.setattr(modelfiles.layout, "load_module", full_load)
    too_short = post_swag(participant, training.model, torch.zeros(28), torch.ones(28))
    accepted = post_swag(participant, training.model, torch.zeros(length), torch.ones(length))

    assert length == 32
    assert too_short.status_code == 400
    assert "28 values, but the global model has 32" in too_short.json()["first_moment_file"][0]
    assert accepted.status_code == 201, accepted.content


def test_update_check_reads_global_layout_once(update_round, hooks, monkeypatch):
    training, participant = update_round
    peer = training.participants.exclude(pk=participant.pk).get()
    reads = []
    real = model_updates.modelfiles.read_state_dict_layout

    def counting(handle, fmt=None):
        reads.append(fmt)
        return real(handle, fmt)

    monkeypatch.setattr(model_updates.modelfiles, "read_state_dict_layout", counting)
    content = state_dict_bytes(tiny_state())

    assert post_update(participant, training.model, content).status_code == 201
    assert post_update(peer, training.model, content).status_code == 201

    assert reads == [training.model.weights_format]
