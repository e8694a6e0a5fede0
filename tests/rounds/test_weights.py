"""Reading updates and writing the new global model in `rounds.weights`."""

from __future__ import annotations

import io
import os
import uuid

import pytest
import torch
from django.core.files.base import ContentFile

from fedserve import modelfiles, modelstore
from fedserve.core.models import FileFormat, Model, ModelKind, Training, User
from fedserve.rounds import weights
from tests.factories import TinyNet, state_dict_bytes
from tests.rounds.conftest import constant_state, started_training, store_update
from tests.test_s3_store import s3_endpoint, s3_store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("lifecycle")


@pytest.fixture
def spool_folder(settings, tmp_path) -> str:
    folder = tmp_path / "spool"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    return str(folder)


def stored_state(path: str, fmt: str) -> dict[str, torch.Tensor]:
    with modelstore.open_file(path) as handle:
        return modelfiles.load_state_dict(handle, fmt)


def store_raw_update(training: Training, user: User, content: bytes) -> Model:
    """Store `content` as a participant's state dict update for round 0."""
    local_id = uuid.uuid4()
    path = modelstore.save(modelstore.model_file_path(local_id, "weights.pt"), ContentFile(content))
    return Model.objects.create(
        id=local_id,
        kind=ModelKind.LOCAL,
        owner=user,
        base_model=training.model,
        round=0,
        sample_size=10,
        weights_path=path,
        weights_format=FileFormat.STATE_DICT,
    )


def test_torchscript_global_written_as_torchscript(spool_folder):
    training, _actor, users = started_training(participants=2)
    store_update(training, users[0], value=1.0, sample_size=30)
    store_update(training, users[1], value=5.0, sample_size=10)

    result = weights.aggregate_updates(training, 0, "a1")

    assert result.path.endswith("weights-round-1-a1.pt")
    assert result.size == os.path.getsize(modelstore.local_path(result.path))
    with modelstore.open_file(result.path) as handle:
        assert modelfiles.detect_format(handle) == FileFormat.TORCHSCRIPT
        module = modelfiles.load_module(handle, FileFormat.TORCHSCRIPT)
    for key, tensor in module.state_dict().items():
        assert torch.allclose(tensor, torch.full_like(tensor, 2.0)), key
    assert module(torch.zeros(1, 4)).shape == (1, 3)
    assert os.listdir(spool_folder) == []


def test_global_model_file_unchanged(spool_folder):
    training, _actor, users = started_training(participants=1)
    before = modelstore.open_file(training.model.weights_path).read()
    store_update(training, users[0], value=3.0)

    weights.aggregate_updates(training, 0, "a1")

    assert modelstore.open_file(training.model.weights_path).read() == before


def test_pickled_module_global_keeps_format(settings, spool_folder):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    training, _actor, users = started_training(participants=1)
    buffer = io.BytesIO()
    torch.save(TinyNet(), buffer)
    model = training.model
    model.weights_path = modelstore.save(
        modelstore.model_file_path(model.pk, "pickled.pt"), ContentFile(buffer.getvalue())
    )
    model.weights_format = FileFormat.PICKLED_MODULE
    model.save()
    store_update(training, users[0], value=4.0)

    result = weights.aggregate_updates(training, 0, "a1")

    with modelstore.open_file(result.path) as handle:
        assert modelfiles.detect_format(handle) == FileFormat.PICKLED_MODULE
    for key, tensor in stored_state(result.path, FileFormat.PICKLED_MODULE).items():
        assert torch.allclose(tensor, torch.full_like(tensor, 4.0)), key
    assert os.listdir(spool_folder) == []


def test_legacy_torch_save_update_aggregates(spool_folder):
    training, _actor, users = started_training(participants=2)
    legacy = io.BytesIO()
    torch.save(constant_state(1.0), legacy, _use_new_zipfile_serialization=False)
    store_raw_update(training, users[0], legacy.getvalue())
    store_raw_update(training, users[1], state_dict_bytes(constant_state(3.0)))

    result = weights.aggregate_updates(training, 0, "a1")

    for key, tensor in stored_state(result.path, FileFormat.TORCHSCRIPT).items():
        assert torch.allclose(tensor, torch.full_like(tensor, 2.0)), key


def test_update_with_python_objects_raises_model_file_error(spool_folder):
    training, _actor, users = started_training(participants=1)
    store_raw_update(training, users[0], state_dict_bytes({"fc1.weight": object()}))  # type: ignore[dict-item]

    with pytest.raises(modelfiles.ModelFileError, match="Python objects"):
        weights.aggregate_updates(training, 0, "a1")


def test_mapped_update_writes_never_reach_file(spool_folder):
    training, _actor, users = started_training(participants=1)
    local = store_update(training, users[0], value=1.0)

    state = weights._load_update(local)
    for tensor in state.values():
        tensor.fill_(7.0)
    del state

    for key, tensor in weights._load_update(local).items():
        assert torch.equal(tensor, torch.ones_like(tensor)), key


def test_s3_store_aggregates_and_stores(s3_store, spool_folder):  # noqa: F811
    training, _actor, users = started_training(participants=2)
    store_update(training, users[0], value=1.0, sample_size=10)
    store_update(training, users[1], value=3.0, sample_size=10)

    result = weights.aggregate_updates(training, 0, "a1")

    assert modelstore.local_path(result.path) is None
    assert result.size == modelstore.size(result.path)
    for key, tensor in stored_state(result.path, FileFormat.TORCHSCRIPT).items():
        assert torch.allclose(tensor, torch.full_like(tensor, 2.0)), key
    assert os.listdir(spool_folder) == []
