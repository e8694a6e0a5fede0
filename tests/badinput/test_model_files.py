"""Files that are not models, or not this model: local updates and preprocessing modules."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from tests.api.test_models_updates import tiny_state
from tests.factories import TinyNet, client_for, state_dict_bytes, torchscript_bytes

pytestmark = pytest.mark.django_db


def saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    return buffer.getvalue()


class OtherNet(torch.nn.Module):
    """A 4-in, 3-out network with other layer names than TinyNet."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def upload(content: bytes, name: str = "update.pt") -> io.BytesIO:
    file = io.BytesIO(content)
    file.name = name
    return file


NOT_MODELS = [
    pytest.param(b"", "The submitted file is empty", id="empty"),
    pytest.param(b"hello world, not weights", "neither a zip archive", id="text"),
    pytest.param(b'{"fc1.weight": [[1, 2]]}', "neither a zip archive", id="json"),
    pytest.param(zip_of_text(), "zip archive but neither", id="zip of text"),
    pytest.param(torchscript_bytes()[:3000], "damaged", id="truncated TorchScript"),
    pytest.param(saved([torch.zeros(1)]), "contains a list, not a state dict", id="list"),
    pytest.param(saved(torch.zeros(3)), "contains a Tensor, not a state dict", id="tensor"),
    pytest.param(saved({"fc1.weight": 1.0}), "'fc1.weight' is a float", id="float entry"),
    pytest.param(
        saved({"state_dict": dict(TinyNet().state_dict())}), "'state_dict' is a dict", id="nested"
    ),
    pytest.param(saved(TinyNet()), "does not unpickle them", id="pickled module"),
]

WRONG_ARCHITECTURES = [
    pytest.param(torchscript_bytes(OtherNet()), "missing keys 'fc1.weight'", id="other layers"),
    pytest.param(
        state_dict_bytes({k: v.to(torch.int64) for k, v in tiny_state().items()}),
        "'fc1.weight' has dtype torch.int64, but the global model's has torch.float32",
        id="integer weights",
    ),
    pytest.param(
        state_dict_bytes({**tiny_state(), "fc2.weight": torch.zeros(3, 9)}),
        "'fc2.weight' has shape [3, 9]",
        id="wider layer",
    ),
    pytest.param(
        state_dict_bytes({**tiny_state(), "fc1.weight": torch.zeros(32)}),
        "'fc1.weight' has shape [32]",
        id="flattened layer",
    ),
]


@pytest.mark.parametrize(("content", "message"), [*NOT_MODELS, *WRONG_ARCHITECTURES])
def test_update_file_rejected(world, unchanged, round_hooks, content, message):
    body = {"round": 2, "sample_size": 5, "model_file": upload(content)}
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/", body, format="multipart"
    )

    assert response.status_code == 400
    assert message in response.json()["model_file"][0]
    assert round_hooks == []
    unchanged()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "too short for a model file"),
        (state_dict_bytes(tiny_state()), "needs an architecture"),
        (zip_of_text(), "zip archive but neither"),
    ],
    ids=["text", "weights only", "zip of text"],
)
def test_preprocessing_file_rejected(world, unchanged, content, message):
    unchanged()

    response = client_for(world.actor).post(
        f"/api/models/{world.model.pk}/preprocessing/",
        {"model_preprocessing_file": upload(content)},
        format="multipart",
    )

    assert response.status_code == 400
    assert message in response.json()["model_preprocessing_file"][0]
    unchanged()


def post_global_model(world, content: bytes, **fields):
    body = {"name": "net", "description": "", "model_file": upload(content), **fields}
    return client_for(world.actor).post("/api/models/", body, format="multipart")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello world, not a model", "neither a zip archive"),
        (state_dict_bytes(tiny_state()), "needs an architecture"),
        (saved(TinyNet()), "does not unpickle them"),
    ],
    ids=["text", "weights only", "pickled module"],
)
def test_global_model_file_rejected(world, unchanged, content, message):
    unchanged()

    response = post_global_model(world, content)

    assert response.status_code == 400
    assert message in response.json()["model_file"][0]
    unchanged()


def with_value(module: torch.nn.Module, key: str, index: tuple[int, ...], value: float):
    with torch.no_grad():
        module.state_dict()[key][index] = value
    return module


NON_FINITE_MODELS = [
    pytest.param(
        torchscript_bytes(with_value(TinyNet(), "fc1.weight", (2, 3), float("nan"))),
        "'fc1.weight' contains NaN values",
        id="TorchScript NaN",
    ),
    pytest.param(
        torchscript_bytes(with_value(TinyNet(), "fc2.bias", (0,), float("-inf"))),
        "'fc2.bias' contains infinite values",
        id="TorchScript infinity",
    ),
    pytest.param(
        saved(with_value(TinyNet(), "fc2.weight", (1, 1), float("inf"))),
        "'fc2.weight' contains infinite values",
        id="pickled module infinity",
    ),
]


@pytest.mark.parametrize("kind", ["GLOBAL", "SWAG"])
@pytest.mark.parametrize(("content", "message"), NON_FINITE_MODELS)
def test_global_model_non_finite_rejected(world, unchanged, settings, kind, content, message):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    unchanged()

    response = post_global_model(world, content, type=kind)

    assert response.status_code == 400
    (error,) = response.json()["model_file"]
    assert message in error
    assert error.endswith("; send finite weights.")
    unchanged()


def test_large_global_model_non_finite_rejected(world, unchanged, monkeypatch):
    # Above this limit check_module_file does not load the archive, so only the scan reads it.
    monkeypatch.setattr("fedserve.modelfiles.loading.MODULE_CHECK_MAX_TENSOR_BYTES", 0)
    monkeypatch.setattr(torch.jit, "load", None)
    content = torchscript_bytes(with_value(TinyNet(), "fc1.bias", (7,), float("nan")))
    unchanged()

    response = post_global_model(world, content)

    assert response.status_code == 400
    assert "'fc1.bias' contains NaN values" in response.json()["model_file"][0]
    unchanged()
