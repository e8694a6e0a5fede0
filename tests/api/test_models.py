"""Global model endpoints: list, upload, download, delete, metadata, metrics, preprocessing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from django.core.files.base import ContentFile

from fedserve import modelfiles, modelstats, modelstore
from fedserve.core.models import Metric, Model, ModelKind, SwagStatistic, TrainingState
from tests.factories import (
    TinyNet,
    client_for,
    make_global_model,
    make_training,
    make_user,
    state_dict_bytes,
    torchscript_bytes,
)
from tests.test_modelfiles_layout import Block, ConvNet, Nested, SharedBlock

pytestmark = pytest.mark.django_db


def upload_file(content: bytes, name: str = "model.pt") -> ContentFile:
    return ContentFile(content, name=name)


def stored_files(folder: Path) -> list[str]:
    return sorted(
        str(Path(root, name).relative_to(folder))
        for root, _dirs, names in os.walk(folder)
        for name in names
    )


def stored_entries(folder: Path) -> list[str]:
    """Every file and folder below `folder`."""
    return sorted(
        str(Path(root, name).relative_to(folder))
        for root, dirs, names in os.walk(folder)
        for name in [*dirs, *names]
    )


@pytest.fixture
def temp_dir(settings, tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    return folder


@pytest.fixture
def hooks(monkeypatch) -> list[tuple]:
    """Record the calls views make to fedserve.rounds instead of running the life cycle."""
    calls: list[tuple] = []
    for name in ("local_model_uploaded", "metrics_uploaded", "swag_statistic_uploaded"):
        monkeypatch.setattr(
            f"fedserve.rounds.{name}", lambda *args, _name=name: calls.append((_name, *args))
        )
    return calls


# List


def test_list_shows_related_global_models(model_store):
    owner, participant, stranger = make_user(), make_user(), make_user()
    own = make_global_model(owner)
    trained = make_global_model(owner)
    make_training(owner, [participant], model=trained)
    make_global_model(stranger)

    owner_ids = {row["id"] for row in client_for(owner).get("/api/models/").json()}
    participant_ids = {row["id"] for row in client_for(participant).get("/api/models/").json()}

    assert owner_ids == {str(own.pk), str(trained.pk)}
    assert participant_ids == {str(trained.pk)}


def test_list_fields_without_weights(model_store):
    owner = make_user()
    model = make_global_model(owner, input_shape=[None, 4])

    (row,) = client_for(owner).get("/api/models/").json()

    assert row["id"] == str(model.pk)
    assert row["owner"] == str(owner.pk)
    assert row["type"] == "GLOBAL"
    assert row["input_shape"] == [None, 4]
    assert row["round"] == 0
    assert {"name", "description", "created_at", "updated_at"} <= row.keys()
    assert not {"base_model", "sample_size", "models", "weights_path"} & row.keys()


def test_list_excludes_local_models(model_store):
    owner = make_user()
    model = make_global_model(owner)
    Model.objects.create(kind=ModelKind.LOCAL, owner=owner, base_model=model, sample_size=3)

    rows = client_for(owner).get("/api/models/").json()

    assert [row["id"] for row in rows] == [str(model.pk)]


def test_list_requires_login():
    assert client_for(None).get("/api/models/").status_code == 401


# Upload of global models


def test_upload_global_model(model_store, temp_dir):
    owner = make_user()
    content = torchscript_bytes()

    response = client_for(owner).post(
        "/api/models/",
        {
            "name": "tiny",
            "description": "a small net",
            "model_file": upload_file(content),
            "input_shape": ["None", "4"],
        },
        format="multipart",
    )

    assert response.status_code == 201, response.content
    assert response.json()["detail"] == "Model Upload Accepted"
    model = Model.objects.get(pk=response.json()["model_id"])
    assert model.kind == ModelKind.GLOBAL
    assert model.owner == owner
    assert model.input_shape == [None, 4]
    assert model.weights_format == "torchscript"
    assert model.weights_size == len(content)
    assert (model_store / model.weights_path).read_bytes() == content
    assert stored_files(temp_dir) == []


def test_upload_swag_model_with_preprocessing(model_store):
    owner = make_user()
    preprocessing = torchscript_bytes(torch.nn.Identity())

    response = client_for(owner).post(
        "/api/models/",
        {
            "name": "swag",
            "description": "",
            "type": "SWAG",
            "model_file": upload_file(torchscript_bytes()),
            "model_preprocessing_file": upload_file(preprocessing, "pre.pt"),
        },
        format="multipart",
    )

    assert response.status_code == 201, response.content
    model = Model.objects.get(pk=response.json()["model_id"])
    assert model.kind == ModelKind.SWAG
    assert model.preprocessing_format == "torchscript"
    assert (model_store / model.preprocessing_path).read_bytes() == preprocessing


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"description": "x"}, "name", "required"),
        ({"name": "x", "description": "x", "type": "LOCAL"}, "type", "POST models/<global"),
        ({"name": "x", "description": "x"}, "model_file", "needs a model_file"),
        ({"name": "x", "description": "x", "input_shape": ["0"]}, "input_shape", "positive"),
        ({"name": "x", "description": "x", "input_shape": ["abc"]}, "input_shape", "'abc'"),
    ],
)
def test_upload_rejects_invalid_fields(model_store, fields, field, message):
    owner = make_user()
    if field != "model_file":
        fields = {**fields, "model_file": upload_file(torchscript_bytes())}

    response = client_for(owner).post("/api/models/", fields, format="multipart")

    assert response.status_code == 400
    assert message in str(response.json()[field])
    assert not Model.objects.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (state_dict_bytes(TinyNet().state_dict()), "needs an architecture"),
        (b"definitely not a model file", "neither a zip archive"),
        (b"PK\x03\x04 a damaged zip archive", "damaged"),
    ],
)
def test_upload_rejects_unusable_file(model_store, temp_dir, content, message):
    owner = make_user()

    response = client_for(owner).post(
        "/api/models/",
        {"name": "x", "description": "x", "model_file": upload_file(content)},
        format="multipart",
    )

    assert response.status_code == 400
    detail = response.json()["model_file"][0]
    assert message in detail
    assert "Accepted formats" in detail
    assert not Model.objects.exists()
    assert stored_files(model_store) == []
    assert stored_files(temp_dir) == []


def test_upload_rejects_bad_preprocessing_and_stores_nothing(model_store):
    owner = make_user()

    response = client_for(owner).post(
        "/api/models/",
        {
            "name": "x",
            "description": "x",
            "model_file": upload_file(torchscript_bytes()),
            "model_preprocessing_file": upload_file(b"garbage bytes here", "pre.pt"),
        },
        format="multipart",
    )

    assert response.status_code == 400
    assert "model_preprocessing_file" in response.json()
    assert stored_files(model_store) == []


def test_upload_failed_save_leaves_no_files(model_store, monkeypatch):
    owner = make_user()

    def fail(*args, **kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(Model, "save", fail)
    client = client_for(owner)
    client.raise_request_exception = False

    response = client.post(
        "/api/models/",
        {"name": "x", "description": "x", "model_file": upload_file(torchscript_bytes())},
        format="multipart",
    )

    assert response.status_code == 500
    assert stored_files(model_store) == []


def test_upload_mean_model_as_json(model_store):
    owner = make_user()
    first, second = make_global_model(owner), make_global_model(owner)

    response = client_for(owner).post(
        "/api/models/",
        {
            "name": "ensemble",
            "description": "two nets",
            "type": "MEAN",
            "models": [str(first.pk), str(second.pk)],
        },
        format="json",
    )

    assert response.status_code == 201, response.content
    mean = Model.objects.get(pk=response.json()["model_id"])
    assert mean.kind == ModelKind.MEAN
    assert set(mean.members.all()) == {first, second}
    assert mean.weights_path == ""
    row = next(r for r in client_for(owner).get("/api/models/").json() if r["type"] == "MEAN")
    assert set(row["models"]) == {str(first.pk), str(second.pk)}


def test_upload_mean_model_as_multipart(model_store):
    owner = make_user()
    member = make_global_model(owner)

    response = client_for(owner).post(
        "/api/models/",
        {"name": "e", "description": "", "type": "MEAN", "models": [str(member.pk)]},
        format="multipart",
    )

    assert response.status_code == 201, response.content


def test_upload_mean_rejects_foreign_member(model_store):
    owner, other = make_user(), make_user()
    foreign = make_global_model(other)

    response = client_for(owner).post(
        "/api/models/",
        {"name": "e", "description": "", "type": "MEAN", "models": [str(foreign.pk)]},
        format="json",
    )

    assert response.status_code == 403
    assert not Model.objects.filter(kind=ModelKind.MEAN).exists()


@pytest.mark.parametrize("case", ["unknown", "local", "empty", "with_file"])
def test_upload_mean_rejects_invalid_members(model_store, case):
    owner = make_user()
    model = make_global_model(owner)
    local = Model.objects.create(kind=ModelKind.LOCAL, owner=owner, base_model=model)
    body = {"name": "e", "description": "", "type": "MEAN"}
    if case == "unknown":
        body["models"] = ["00000000-0000-4000-8000-000000000000"]
    elif case == "local":
        body["models"] = [str(local.pk)]
    elif case == "with_file":
        body["models"] = [str(model.pk)]
        body["model_file"] = upload_file(torchscript_bytes())

    response = client_for(owner).post("/api/models/", body, format="multipart")

    assert response.status_code == 400
    assert not Model.objects.filter(kind=ModelKind.MEAN).exists()


def test_upload_rejects_form_urlencoded(model_store):
    owner = make_user()
    response = client_for(owner).post(
        "/api/models/", "name=x", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 415


# Download


def test_download_streams_file_with_headers(model_store):
    owner = make_user()
    model = make_global_model(owner)

    response = client_for(owner).get(f"/api/models/{model.pk}/")

    assert response.status_code == 200
    assert response.streaming
    body = b"".join(response.streaming_content)
    assert body == (model_store / model.weights_path).read_bytes()
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Length"] == str(len(body))
    assert response["Content-Disposition"] == f'filename="model-{model.pk}.pt"'


def test_download_accepts_octet_stream_header(model_store):
    owner = make_user()
    model = make_global_model(owner)

    response = client_for(owner).get(
        f"/api/models/{model.pk}/", HTTP_ACCEPT="application/octet-stream"
    )

    assert response.status_code == 200


def test_download_errors(model_store):
    owner, stranger = make_user(), make_user()
    model = make_global_model(owner)
    mean = Model.objects.create(kind=ModelKind.MEAN, owner=owner)

    assert client_for(stranger).get(f"/api/models/{model.pk}/").status_code == 403
    assert client_for(None).get(f"/api/models/{model.pk}/").status_code == 401
    missing = client_for(owner).get("/api/models/00000000-0000-4000-8000-000000000000/")
    assert missing.status_code == 404
    assert "was not found" in missing.json()["detail"]
    assert client_for(owner).get(f"/api/models/{mean.pk}/").status_code == 404


def test_download_missing_file_is_404(model_store):
    owner = make_user()
    model = make_global_model(owner)
    (model_store / model.weights_path).unlink()

    response = client_for(owner).get(f"/api/models/{model.pk}/")

    assert response.status_code == 404
    assert "missing from the model store" in response.json()["detail"]


# Delete


def test_delete_removes_every_file(model_store, django_capture_on_commit_callbacks):
    owner, participant = make_user(), make_user()
    model = make_global_model(owner)
    model.preprocessing_path = modelstore.save(
        modelstore.model_file_path(model.pk, "preprocessing.pt"), ContentFile(b"pre")
    )
    model.swag_first_moment_path = modelstore.save(
        modelstore.model_file_path(model.pk, "first.pt"), ContentFile(b"1")
    )
    model.save()
    make_training(owner, [participant], model=model)
    local = Model.objects.create(kind=ModelKind.LOCAL, owner=participant, base_model=model)
    local.weights_path = modelstore.save(
        modelstore.model_file_path(local.pk, "weights.pt"), ContentFile(b"w")
    )
    local.save()
    statistic = SwagStatistic.objects.create(
        model=model,
        owner=participant,
        round=0,
        sample_size=1,
        first_moment_path="",
        second_moment_path="",
    )
    statistic.first_moment_path = modelstore.save(
        modelstore.swag_file_path(statistic.pk, "first.pt"), ContentFile(b"1")
    )
    statistic.second_moment_path = modelstore.save(
        modelstore.swag_file_path(statistic.pk, "second.pt"), ContentFile(b"2")
    )
    statistic.save()
    assert len(stored_files(model_store)) == 6

    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(owner).delete(f"/api/models/{model.pk}/")

    assert response.status_code == 200
    assert response.json() == {"detail": "Model removed!"}
    assert not Model.objects.exists()
    assert not SwagStatistic.objects.exists()
    assert stored_entries(model_store) == ["models", "swag"]


def test_delete_by_actor_and_rejected_for_others(model_store):
    owner, actor, participant = make_user(), make_user(), make_user()
    model = make_global_model(owner)
    make_training(actor, [participant], model=model)

    assert client_for(participant).delete(f"/api/models/{model.pk}/").status_code == 403
    assert client_for(actor).delete(f"/api/models/{model.pk}/").status_code == 200
    assert client_for(actor).delete(f"/api/models/{model.pk}/").status_code == 404


def test_delete_keeps_files_when_transaction_fails(model_store, monkeypatch):
    owner = make_user()
    model = make_global_model(owner)

    def fail(self, *args, **kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(Model, "delete", fail)
    client = client_for(owner)
    client.raise_request_exception = False

    assert client.delete(f"/api/models/{model.pk}/").status_code == 500
    assert (model_store / model.weights_path).exists()


# Metadata


def test_metadata_with_layer_stats(model_store):
    owner = make_user()
    model = make_global_model(owner, input_shape=[None, 4])

    data = client_for(owner).get(f"/api/models/{model.pk}/metadata/").json()

    assert data["id"] == str(model.pk)
    assert data["has_preprocessing"] is False
    stats = data["stats"]
    assert stats["format"] == "torchscript"
    assert stats["file_size"] == model.weights_size
    assert stats["total_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert stats["trainable_parameters"] == stats["total_parameters"]
    assert stats["parameter_bytes"] == stats["total_parameters"] * 4
    assert stats["input_shape"] == [1, 4]
    assert stats["output_shape"] == [1, 3]
    assert [layer["name"] for layer in stats["layers"]] == ["fc1", "dropout", "fc2"]
    assert stats["layers"][0] == {
        "name": "fc1",
        "type": "Linear",
        "parameters": 40,
        "output_shape": None,
    }


def test_metadata_pickled_module_has_layer_shapes(model_store, settings):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    owner = make_user()
    buffer = io.BytesIO()
    torch.save(TinyNet(), buffer)

    response = client_for(owner).post(
        "/api/models/",
        {
            "name": "pickled",
            "description": "",
            "model_file": upload_file(buffer.getvalue()),
            "input_shape": ["None", "4"],
        },
        format="multipart",
    )
    assert response.status_code == 201, response.content
    model_id = response.json()["model_id"]

    stats = client_for(owner).get(f"/api/models/{model_id}/metadata/").json()["stats"]

    assert stats["format"] == "pickled_module"
    assert [layer["output_shape"] for layer in stats["layers"]] == [[1, 8], [1, 8], [1, 3]]


def frozen_block() -> Block:
    block = Block()
    block.linear.requires_grad_(False)
    return block


@pytest.mark.parametrize("make_module", [TinyNet, frozen_block, Nested, SharedBlock, ConvNet])
def test_metadata_stats_from_layout_unchanged(model_store, monkeypatch, make_module):
    owner = make_user()
    model = make_global_model(owner, input_shape=None)
    model.weights_path = modelstore.save(
        modelstore.model_file_path(model.pk, "module.pt"),
        ContentFile(torchscript_bytes(make_module())),
    )
    model.weights_size = modelstore.size(model.weights_path)
    model.save()
    url = f"/api/models/{model.pk}/metadata/"

    def load_on_meta(fileobj, fmt=None):
        module = modelfiles.load_module(fileobj, fmt, map_location="meta")
        return modelfiles.ModuleLayout(list(module.parameters()), list(module.buffers()))

    with monkeypatch.context() as loading:
        loading.setattr(modelstats.modelfiles, "read_module_layout", load_on_meta)
        loaded = client_for(owner).get(url).json()
    monkeypatch.setattr(torch.jit, "load", None)
    read = client_for(owner).get(url).json()

    assert loaded["stats"] is not None
    assert read == loaded


def test_metadata_without_input_shape_has_no_layers(model_store):
    owner = make_user()
    model = make_global_model(owner, input_shape=None)

    stats = client_for(owner).get(f"/api/models/{model.pk}/metadata/").json()["stats"]

    assert stats["total_parameters"] == 67
    assert stats["layers"] is None


def test_metadata_wrong_input_shape_has_no_layers(model_store):
    owner = make_user()
    model = make_global_model(owner, input_shape=[None, 5])

    response = client_for(owner).get(f"/api/models/{model.pk}/metadata/")

    assert response.status_code == 200
    assert response.json()["stats"]["layers"] is None
    assert response.json()["stats"]["total_parameters"] == 67


def test_metadata_of_mean_and_unreadable_files(model_store):
    owner = make_user()
    mean = Model.objects.create(kind=ModelKind.MEAN, owner=owner)
    broken = make_global_model(owner)
    (model_store / broken.weights_path).write_bytes(b"PK\x03\x04 broken")
    lost = make_global_model(owner)
    (model_store / lost.weights_path).unlink()

    for model in (mean, broken, lost):
        response = client_for(owner).get(f"/api/models/{model.pk}/metadata/")
        assert response.status_code == 200
        assert response.json()["stats"] is None


def test_metadata_of_local_state_dict(model_store):
    owner = make_user()
    model = make_global_model(owner)
    model.preprocessing_path = "models/x/pre.pt"
    model.save()
    local = Model.objects.create(kind=ModelKind.LOCAL, owner=owner, base_model=model, sample_size=4)
    local.weights_path = modelstore.save(
        modelstore.model_file_path(local.pk, "weights.pt"),
        ContentFile(state_dict_bytes(TinyNet().state_dict())),
    )
    local.weights_format = "state_dict"
    local.save()

    data = client_for(owner).get(f"/api/models/{local.pk}/metadata/").json()

    assert data["type"] == "LOCAL"
    assert data["base_model"] == str(model.pk)
    assert data["sample_size"] == 4
    assert data["has_preprocessing"] is True
    assert data["stats"]["total_parameters"] == 67
    assert data["stats"]["layers"] is None


def test_metadata_permissions(model_store):
    owner, stranger = make_user(), make_user()
    model = make_global_model(owner)

    assert client_for(stranger).get(f"/api/models/{model.pk}/metadata/").status_code == 403
    missing = "/api/models/00000000-0000-4000-8000-000000000000/metadata/"
    assert client_for(owner).get(missing).status_code == 404


# Metrics


def test_metrics_post_json_and_list(model_store, hooks, django_capture_on_commit_callbacks):
    owner = make_user()
    model = make_global_model(owner, round=3)

    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(owner).post(
            f"/api/models/{model.pk}/metrics/",
            {"metric_names": ["accuracy", "note", "loss"], "metric_values": [0.9, "good", "nan"]},
            format="json",
        )

    assert response.status_code == 201, response.content
    assert response.json() == {"detail": "Model Metrics Upload Accepted", "model_id": str(model.pk)}
    rows = client_for(owner).get(f"/api/models/{model.pk}/metrics/").json()
    assert [(r["key"], r["value_float"], r["value_text"]) for r in rows] == [
        ("accuracy", 0.9, None),
        ("note", None, "good"),
        ("loss", None, "nan"),
    ]
    assert {r["step"] for r in rows} == {3}
    assert {r["reporter"] for r in rows} == {str(owner.pk)}
    assert hooks == [("metrics_uploaded", model, owner.pk)]


def test_metrics_post_as_form_fields(model_store, hooks):
    owner = make_user()
    model = make_global_model(owner)

    response = client_for(owner).post(
        f"/api/models/{model.pk}/metrics/",
        {"metric_names": ["accuracy", "f1"], "metric_values": ["0.5", "0.25"]},
        format="multipart",
    )

    assert response.status_code == 201, response.content
    assert list(Metric.objects.values_list("key", "value_float")) == [
        ("accuracy", 0.5),
        ("f1", 0.25),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metric_names": ["a", "b"], "metric_values": [1.0]}, "metric_values"),
        ({"metric_names": [], "metric_values": []}, "metric_names"),
        ({"metric_names": ["a"]}, "metric_values"),
    ],
)
def test_metrics_post_rejects_invalid_lists(model_store, hooks, body, field):
    owner = make_user()
    model = make_global_model(owner)

    response = client_for(owner).post(f"/api/models/{model.pk}/metrics/", body, format="json")

    assert response.status_code == 400
    assert field in response.json()
    assert not Metric.objects.exists()
    assert hooks == []


def test_metrics_permissions(model_store, hooks):
    owner, participant, stranger = make_user(), make_user(), make_user()
    model = make_global_model(owner)
    make_training(owner, [participant], model=model)
    body = {"metric_names": ["a"], "metric_values": [1]}
    url = f"/api/models/{model.pk}/metrics/"

    assert client_for(participant).post(url, body, format="json").status_code == 201
    assert client_for(stranger).post(url, body, format="json").status_code == 403
    assert client_for(stranger).get(url).status_code == 403


# Preprocessing


def test_preprocessing_upload_and_download(model_store, django_capture_on_commit_callbacks):
    owner = make_user()
    model = make_global_model(owner)
    url = f"/api/models/{model.pk}/preprocessing/"
    first = torchscript_bytes(torch.nn.Identity())
    second = torchscript_bytes(torch.nn.Flatten())

    assert client_for(owner).get(url).status_code == 404
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(owner).post(
            url, {"model_preprocessing_file": upload_file(first)}, format="multipart"
        )
    assert response.status_code == 202, response.content
    download = client_for(owner).get(url)
    assert b"".join(download.streaming_content) == first
    assert download["Content-Disposition"] == f'filename="model-{model.pk}-preprocessing.pt"'

    with django_capture_on_commit_callbacks(execute=True):
        client_for(owner).post(
            url, {"model_preprocessing_file": upload_file(second)}, format="multipart"
        )

    assert b"".join(client_for(owner).get(url).streaming_content) == second
    assert len([p for p in stored_files(model_store) if "preprocessing" in p]) == 1
    assert client_for(owner).get(f"/api/models/{model.pk}/metadata/").json()["has_preprocessing"]


def test_preprocessing_of_local_model_is_global_one(model_store):
    owner = make_user()
    model = make_global_model(owner)
    model.preprocessing_path = modelstore.save(
        modelstore.model_file_path(model.pk, "preprocessing.pt"), ContentFile(b"pre")
    )
    model.save()
    local = Model.objects.create(kind=ModelKind.LOCAL, owner=owner, base_model=model)

    response = client_for(owner).get(f"/api/models/{local.pk}/preprocessing/")

    assert b"".join(response.streaming_content) == b"pre"


def test_preprocessing_upload_errors(model_store):
    owner, participant = make_user(), make_user()
    model = make_global_model(owner)
    make_training(owner, [participant], model=model)
    local = Model.objects.create(kind=ModelKind.LOCAL, owner=owner, base_model=model)
    url = f"/api/models/{model.pk}/preprocessing/"

    def post(user, target_url, content):
        return client_for(user).post(
            target_url, {"model_preprocessing_file": upload_file(content)}, format="multipart"
        )

    assert post(participant, url, torchscript_bytes()).status_code == 403
    bad = post(owner, url, state_dict_bytes({"w": torch.ones(2)}))
    assert bad.status_code == 400
    assert "Accepted formats" in bad.json()["model_preprocessing_file"][0]
    local_url = f"/api/models/{local.pk}/preprocessing/"
    assert post(owner, local_url, torchscript_bytes()).status_code == 400
    assert client_for(owner).post(url, {}, format="multipart").status_code == 400
    assert Model.objects.get(pk=model.pk).preprocessing_path == ""


# Models of a training


def test_training_models_lists_global_and_local(model_store):
    actor, first, second, stranger = make_user(), make_user(), make_user(), make_user()
    training = make_training(actor, [first, second])
    model = training.model
    older = Model.objects.create(
        kind=ModelKind.LOCAL, owner=first, base_model=model, round=0, sample_size=1
    )
    newer = Model.objects.create(
        kind=ModelKind.LOCAL, owner=first, base_model=model, round=1, sample_size=1
    )
    other = Model.objects.create(
        kind=ModelKind.LOCAL, owner=second, base_model=model, round=0, sample_size=1
    )

    every = client_for(first).get(f"/api/trainings/{training.pk}/models/").json()
    latest = client_for(actor).get(f"/api/trainings/{training.pk}/models/latest/").json()

    assert [row["id"] for row in every] == [str(m.pk) for m in (model, older, other, newer)]
    assert [row["id"] for row in latest] == [str(m.pk) for m in (model, newer, other)]
    assert every[1]["base_model"] == str(model.pk)
    forbidden = client_for(stranger).get(f"/api/trainings/{training.pk}/models/")
    assert forbidden.status_code == 403


def test_training_models_latest_without_local_models(model_store):
    actor, participant = make_user(), make_user()
    training = make_training(actor, [participant], state=TrainingState.ONGOING)

    response = client_for(participant).get(f"/api/trainings/{training.pk}/models/latest/")

    assert response.status_code == 200
    assert [row["id"] for row in response.json()] == [str(training.model_id)]


def test_training_models_unknown_training(model_store):
    user = make_user()
    for suffix in ("models/", "models/latest/"):
        url = f"/api/trainings/00000000-0000-4000-8000-000000000000/{suffix}"
        assert client_for(user).get(url).status_code == 404
