"""Trainings endpoints: create, list, detail, delete, participants and start."""

from __future__ import annotations

import uuid

import pytest
from django.core.files.base import ContentFile

from fedserve import modelstore
from fedserve.core.models import (
    Metric,
    Model,
    ModelKind,
    Notification,
    Participation,
    RoundPhase,
    SwagStatistic,
    Training,
    TrainingState,
)
from fedserve.rounds.options import TrainingOptions
from tests.factories import client_for, make_global_model, make_training, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("model_store")]

TRAINING_FIELDS = {
    "id",
    "model",
    "actor",
    "participants",
    "state",
    "target_num_updates",
    "last_update",
    "uncertainty_method",
    "aggregation_method",
    "options",
    "locked",
    "metric_names",
    "local_models_arrived",
    "local_models_expected",
    "phase",
    "round",
    "missing_participants",
    "unreachable_participants",
    "error_reason",
}


def create_body(model, users=(), **fields):
    return {
        "model_id": str(model.pk),
        "target_num_updates": 3,
        "metric_names": ["accuracy"],
        "aggregation_method": "FedAvg",
        "clients": [str(user.pk) for user in users],
        **fields,
    }


def post_training(user, body):
    return client_for(user).post("/api/trainings/", body, format="json")


def make_local_model(training, owner, round_number=None):
    base = training.model
    return Model.objects.create(
        kind=ModelKind.LOCAL,
        owner=owner,
        base_model=base,
        round=base.round if round_number is None else round_number,
        sample_size=10,
    )


def store_file(model, name, content=b"data"):
    return modelstore.save(modelstore.model_file_path(model.pk, name), ContentFile(content))


# Create


def test_create_returns_training_id():
    owner = make_user()
    model = make_global_model(owner)
    participant = make_user()

    response = post_training(owner, create_body(model, [participant]))

    assert response.status_code == 201
    body = response.json()
    assert body["detail"] == "Training created successfully!"
    training = Training.objects.get(pk=body["training_id"])
    assert training.model == model
    assert training.actor == owner
    assert training.state == TrainingState.INITIAL
    assert training.target_num_updates == 3
    assert training.metric_names == ["accuracy"]
    assert training.aggregation_method == "FedAvg"
    assert training.uncertainty_method == "NONE"
    assert list(training.participants.all()) == [participant]


def test_create_stores_parsed_options():
    owner = make_user()
    model = make_global_model(owner)
    options = {"daisy_chain_period": 2, "uncertainty": {"N": 5, "softmax": True}}

    response = post_training(owner, create_body(model, aggregation_method="FedDC", options=options))

    assert response.status_code == 201
    stored = Training.objects.get(pk=response.json()["training_id"]).options
    parsed = TrainingOptions.parse(stored)
    assert parsed.daisy_chain_period == 2
    assert parsed.uncertainty.N == 5
    assert parsed.uncertainty.softmax is True


def test_create_deduplicates_clients():
    owner = make_user()
    participant = make_user()
    body = create_body(make_global_model(owner), [participant, participant])

    response = post_training(owner, body)

    assert response.status_code == 201
    assert Participation.objects.count() == 1


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"target_num_updates": 0}, "target_num_updates", ""),
        ({"target_num_updates": "many"}, "target_num_updates", ""),
        ({"aggregation_method": None}, "aggregation_method", ""),
        ({"aggregation_method": "FedMedian"}, "aggregation_method", "FedMedian"),
        ({"uncertainty_method": "BAYES"}, "uncertainty_method", "BAYES"),
        ({"metric_names": "accuracy"}, "metric_names", ""),
        ({"options": {"bogus": 1}}, "options", "'bogus'"),
        ({"options": {"daisy_chain_period": 0}}, "options", "daisy_chain_period"),
        ({"options": []}, "options", "JSON object"),
        ({"clients": ["not-a-uuid"]}, "clients", ""),
        ({"model_id": "42"}, "model_id", ""),
    ],
)
def test_create_rejects_invalid_field(fields, field, fragment):
    owner = make_user()
    model = make_global_model(owner)

    response = post_training(owner, create_body(model, **fields))

    assert response.status_code == 400
    assert field in response.json()
    assert fragment in str(response.json()[field])
    assert not Training.objects.exists()


def test_create_without_aggregation_method_is_400():
    owner = make_user()
    body = create_body(make_global_model(owner))
    del body["aggregation_method"]

    response = post_training(owner, body)

    assert response.status_code == 400
    assert "aggregation_method" in response.json()


def test_create_unknown_clients_named():
    owner = make_user()
    missing = uuid.uuid4()
    body = create_body(make_global_model(owner), [make_user()])
    body["clients"].append(str(missing))

    response = post_training(owner, body)

    assert response.status_code == 400
    assert str(missing) in response.json()["clients"][0]
    assert not Training.objects.exists()
    assert not Participation.objects.exists()


def test_create_unknown_model_is_404():
    owner = make_user()
    body = create_body(make_global_model(owner))
    body["model_id"] = str(uuid.uuid4())

    response = post_training(owner, body)

    assert response.status_code == 404
    assert body["model_id"] in response.json()["detail"]


def test_create_by_non_owner_is_403():
    model = make_global_model(make_user())

    response = post_training(make_user(), create_body(model))

    assert response.status_code == 403
    assert not Training.objects.exists()


def test_create_on_mean_model_is_400():
    owner = make_user()
    member = make_global_model(owner)
    mean = Model.objects.create(owner=owner, kind=ModelKind.MEAN, name="ensemble")
    mean.members.set([member])

    response = post_training(owner, create_body(mean))

    assert response.status_code == 400
    assert "MEAN" in response.json()["model_id"][0]
    assert not Training.objects.exists()


def test_create_on_local_model_is_400():
    owner = make_user()
    training = make_training(owner, [owner])
    local = make_local_model(training, owner)

    response = post_training(owner, create_body(local))

    assert response.status_code == 400
    assert "model_id" in response.json()


def test_create_copies_model_already_in_training(model_store):
    owner = make_user()
    first = make_training(owner, [])
    model = first.model
    model.round = 4
    model.preprocessing_path = store_file(model, "preprocessing.pt", b"pre")
    model.preprocessing_format = "torchscript"
    model.save()

    response = post_training(owner, create_body(model))

    assert response.status_code == 201
    training = Training.objects.get(pk=response.json()["training_id"])
    copy = training.model
    assert copy.pk != model.pk
    assert copy.owner == owner
    assert copy.round == 0
    assert copy.name == model.name
    assert copy.input_shape == model.input_shape
    assert copy.weights_path.startswith(f"models/{copy.pk}/")
    assert copy.weights_path != model.weights_path
    assert (model_store / copy.weights_path).read_bytes() == (
        model_store / model.weights_path
    ).read_bytes()
    assert (model_store / copy.preprocessing_path).read_bytes() == b"pre"
    first.refresh_from_db()
    assert first.model_id == model.pk


def test_create_swag_converts_global_model():
    owner = make_user()
    model = make_global_model(owner)

    response = post_training(owner, create_body(model, uncertainty_method="SWAG"))

    assert response.status_code == 201
    model.refresh_from_db()
    assert model.kind == ModelKind.SWAG


def test_create_failure_removes_copied_files(model_store, monkeypatch):
    owner = make_user()
    model = make_training(owner, []).model
    files_before = sorted(p for p in model_store.rglob("*") if p.is_file())

    def fail(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(Participation.objects, "bulk_create", fail)
    with pytest.raises(RuntimeError):
        post_training(owner, create_body(model, [make_user()]))

    assert sorted(p for p in model_store.rglob("*") if p.is_file()) == files_before
    assert Model.objects.count() == 1
    assert Training.objects.count() == 1


# List and detail


def test_list_shows_only_acted_trainings():
    actor = make_user()
    mine = make_training(actor, [])
    make_training(make_user(), [actor])

    response = client_for(actor).get("/api/trainings/")

    assert response.status_code == 200
    assert [item["id"] for item in response.json()] == [str(mine.pk)]


def test_detail_fields_for_participant():
    actor = make_user()
    first, second = make_user(), make_user()
    training = make_training(actor, [first, second])

    response = client_for(first).get(f"/api/trainings/{training.pk}/")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == TRAINING_FIELDS
    assert body["model"] == str(training.model_id)
    assert body["actor"] == str(actor.pk)
    assert sorted(body["participants"]) == sorted([str(first.pk), str(second.pk)])
    assert body["state"] == "I"
    assert body["phase"] == ""
    assert body["round"] == 0
    assert body["local_models_arrived"] == 0
    assert body["local_models_expected"] == 2
    assert body["missing_participants"] == []
    assert body["unreachable_participants"] == []
    assert body["error_reason"] == ""


def test_detail_counts_update_round():
    actor = make_user()
    first, second = make_user(), make_user()
    training = make_training(
        actor,
        [first, second],
        state=TrainingState.ONGOING,
        phase=RoundPhase.UPDATE,
        phase_round=2,
    )
    training.model.round = 2
    training.model.save()
    make_local_model(training, first, round_number=2)
    make_local_model(training, second, round_number=1)

    body = client_for(actor).get(f"/api/trainings/{training.pk}/").json()

    assert body["round"] == 2
    assert body["local_models_arrived"] == 1
    assert body["local_models_expected"] == 2
    assert body["missing_participants"] == [str(second.pk)]


def test_detail_missing_in_test_round():
    actor = make_user()
    first, second = make_user(), make_user()
    training = make_training(
        actor, [first, second], state=TrainingState.ONGOING, phase=RoundPhase.MODEL_TEST
    )
    Metric.objects.create(
        model=training.model, identifier="accuracy", value_float=0.9, step=0, reporter=second
    )

    body = client_for(actor).get(f"/api/trainings/{training.pk}/").json()

    assert body["phase"] == "MODEL_TEST"
    assert body["missing_participants"] == [str(first.pk)]


def test_detail_missing_in_swag_round():
    actor = make_user()
    first, second = make_user(), make_user()
    training = make_training(
        actor, [first, second], state=TrainingState.SWAG_ROUND, phase=RoundPhase.SWAG
    )
    SwagStatistic.objects.create(
        model=training.model,
        owner=first,
        round=0,
        sample_size=5,
        first_moment_path="swag/a/first.pt",
        second_moment_path="swag/a/second.pt",
    )

    body = client_for(actor).get(f"/api/trainings/{training.pk}/").json()

    assert body["missing_participants"] == [str(second.pk)]


def test_detail_lists_unreachable_participants():
    actor = make_user()
    first, second = make_user(), make_user()
    training = make_training(actor, [first, second])
    Participation.objects.filter(training=training, user=second).update(unreachable=True)

    body = client_for(actor).get(f"/api/trainings/{training.pk}/").json()

    assert body["unreachable_participants"] == [str(second.pk)]


def test_detail_unrelated_user_is_403():
    training = make_training(make_user(), [make_user()])

    response = client_for(make_user()).get(f"/api/trainings/{training.pk}/")

    assert response.status_code == 403


def test_detail_missing_is_404():
    response = client_for(make_user()).get(f"/api/trainings/{uuid.uuid4()}/")

    assert response.status_code == 404


# Delete


def test_delete_removes_rows_and_files(model_store, django_capture_on_commit_callbacks):
    actor = make_user()
    participant = make_user()
    training = make_training(actor, [participant])
    model = training.model
    local = make_local_model(training, participant)
    local.weights_path = store_file(local, "weights.pt")
    local.save()
    statistic = SwagStatistic.objects.create(
        model=model,
        owner=participant,
        round=0,
        sample_size=5,
        first_moment_path=modelstore.save("swag/s1/first.pt", ContentFile(b"1")),
        second_moment_path=modelstore.save("swag/s1/second.pt", ContentFile(b"2")),
    )
    assert len([p for p in model_store.rglob("*") if p.is_file()]) == 4

    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(actor).delete(f"/api/trainings/{training.pk}/")

    assert response.status_code == 200
    assert response.json() == {"detail": "Training removed!"}
    assert not Training.objects.filter(pk=training.pk).exists()
    assert not Model.objects.filter(pk__in=[model.pk, local.pk]).exists()
    assert not SwagStatistic.objects.filter(pk=statistic.pk).exists()
    assert [p for p in model_store.rglob("*") if p.is_file()] == []
    assert not (model_store / "models" / str(model.pk)).exists()


def test_delete_by_participant_is_403(model_store):
    participant = make_user()
    training = make_training(make_user(), [participant])

    response = client_for(participant).delete(f"/api/trainings/{training.pk}/")

    assert response.status_code == 403
    assert Training.objects.filter(pk=training.pk).exists()
    assert (model_store / training.model.weights_path).exists()


# Participants


def test_put_clients_adds_participants():
    actor = make_user()
    present, newcomer = make_user(), make_user()
    training = make_training(actor, [present])

    response = client_for(actor).put(
        f"/api/trainings/{training.pk}/clients/",
        {"clients": [str(present.pk), str(newcomer.pk)]},
        format="json",
    )

    assert response.status_code == 202
    assert set(training.participants.all()) == {present, newcomer}


def test_put_clients_unknown_is_400():
    actor = make_user()
    training = make_training(actor, [])
    missing = str(uuid.uuid4())

    response = client_for(actor).put(
        f"/api/trainings/{training.pk}/clients/",
        {"clients": [str(make_user().pk), missing]},
        format="json",
    )

    assert response.status_code == 400
    assert missing in response.json()["clients"][0]
    assert not training.participants.exists()


@pytest.mark.parametrize("body", [{}, {"clients": []}, {"clients": "abc"}])
def test_put_clients_invalid_body_is_400(body):
    actor = make_user()
    training = make_training(actor, [])

    response = client_for(actor).put(f"/api/trainings/{training.pk}/clients/", body, format="json")

    assert response.status_code == 400
    assert "clients" in response.json()


def test_put_clients_after_start_is_409():
    actor = make_user()
    training = make_training(actor, [make_user()], state=TrainingState.ONGOING)

    response = client_for(actor).put(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(make_user().pk)]}, format="json"
    )

    assert response.status_code == 409
    assert "'O'" in response.json()["detail"]
    assert training.participants.count() == 1


def test_put_clients_by_participant_is_403():
    participant = make_user()
    training = make_training(make_user(), [participant])

    response = client_for(participant).put(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(make_user().pk)]}, format="json"
    )

    assert response.status_code == 403
    assert training.participants.count() == 1


def test_delete_clients_removes_and_notifies_rounds(monkeypatch):
    calls = []
    monkeypatch.setattr("fedserve.api.views.trainings.rounds.participants_removed", calls.append)
    actor = make_user()
    staying, leaving = make_user(), make_user()
    training = make_training(actor, [staying, leaving], state=TrainingState.ONGOING)

    response = client_for(actor).delete(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(leaving.pk)]}, format="json"
    )

    assert response.status_code == 200
    assert list(training.participants.all()) == [staying]
    assert [t.pk for t in calls] == [training.pk]
    removal = Notification.objects.get(recipient=leaving)
    assert removal.notification_type == "CLIENT_REMOVED"
    assert removal.training_id == training.pk
    assert not Notification.objects.filter(recipient=staying).exists()


def test_delete_clients_before_start_sends_nothing(monkeypatch):
    monkeypatch.setattr("fedserve.api.views.trainings.rounds.participants_removed", lambda t: None)
    actor = make_user()
    leaving = make_user()
    training = make_training(actor, [make_user(), leaving])

    response = client_for(actor).delete(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(leaving.pk)]}, format="json"
    )

    assert response.status_code == 200
    assert not Notification.objects.exists()


def test_delete_clients_not_participant_is_400(monkeypatch):
    calls = []
    monkeypatch.setattr("fedserve.api.views.trainings.rounds.participants_removed", calls.append)
    actor = make_user()
    participant, outsider = make_user(), make_user()
    training = make_training(actor, [participant])

    response = client_for(actor).delete(
        f"/api/trainings/{training.pk}/clients/",
        {"clients": [str(participant.pk), str(outsider.pk)]},
        format="json",
    )

    assert response.status_code == 400
    assert str(outsider.pk) in response.json()["clients"][0]
    assert list(training.participants.all()) == [participant]
    assert calls == []


# Start


def test_start_moves_training_to_ongoing():
    actor = make_user()
    training = make_training(actor, [make_user()])

    response = client_for(actor).post(f"/api/trainings/{training.pk}/start/")

    assert response.status_code == 202
    assert response.json() == {"detail": "Training started!"}
    training.refresh_from_db()
    assert training.state == TrainingState.ONGOING


def test_start_without_participants_is_400():
    actor = make_user()
    training = make_training(actor, [])

    response = client_for(actor).post(f"/api/trainings/{training.pk}/start/")

    assert response.status_code == 400
    assert "no participants" in response.json()["detail"]
    training.refresh_from_db()
    assert training.state == TrainingState.INITIAL


@pytest.mark.parametrize("state", ["O", "S", "C", "E"])
def test_start_in_other_state_is_400(state, monkeypatch):
    calls = []
    monkeypatch.setattr("fedserve.api.views.trainings.rounds.start_training", calls.append)
    actor = make_user()
    training = make_training(actor, [make_user()], state=state)

    response = client_for(actor).post(f"/api/trainings/{training.pk}/start/")

    assert response.status_code == 400
    assert f"'{state}'" in response.json()["detail"]
    assert calls == []


def test_start_by_participant_is_403():
    participant = make_user()
    training = make_training(make_user(), [participant])

    response = client_for(participant).post(f"/api/trainings/{training.pk}/start/")

    assert response.status_code == 403
    training.refresh_from_db()
    assert training.state == TrainingState.INITIAL


def test_start_lost_race_is_400(monkeypatch):
    monkeypatch.setattr(
        "fedserve.api.views.trainings.rounds.start_training", lambda training: False
    )
    actor = make_user()
    training = make_training(actor, [make_user()])

    response = client_for(actor).post(f"/api/trainings/{training.pk}/start/")

    assert response.status_code == 400
    assert "already been started" in response.json()["detail"]
