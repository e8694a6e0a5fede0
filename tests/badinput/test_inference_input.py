"""Inference inputs of the wrong shape or type, as JSON and as files."""

from __future__ import annotations

import io

import pytest
import torch

from tests.api.test_models_updates import tiny_state
from tests.factories import client_for, state_dict_bytes

pytestmark = pytest.mark.django_db

SHAPE_MESSAGE = "expects input of shape [null, 4] (null is a free dimension)"


def tensor_file(tensor: torch.Tensor) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    buffer.seek(0)
    buffer.name = "input.pt"
    return buffer


@pytest.mark.parametrize(
    ("model_input", "fragment"),
    [
        ([[1, 2, 3, 4], [1, 2]], "must be a rectangular nested list"),
        ([["a", "b", "c", "d"]], "contains str 'a'"),
        ({"x": 1}, "not dict {'x': 1}"),
        (3.0, "not float 3.0"),
        ("1,2,3,4", "not valid base64"),
        ([], "has shape [0]"),
        ([[1, 2, 3]], "has shape [1, 3]"),
        ([1, 2, 3, 4], "has shape [4]"),
        ([[[1, 2, 3, 4]]], "has shape [1, 1, 4]"),
    ],
)
def test_json_input_rejected(world, unchanged, model_input, fragment):
    body = {"model_id": str(world.model.pk), "model_input": model_input}
    unchanged()

    response = client_for(world.actor).post("/api/inference/", body, format="json")

    assert response.status_code == 400
    assert fragment in response.json()["detail"]
    unchanged()


def test_deeply_nested_input_rejected(world, unchanged):
    nested = "[" * 100_000 + "]" * 100_000
    body = f'{{"model_id": "{world.model.pk}", "model_input": {nested}}}'
    unchanged()

    response = client_for(world.actor).post(
        "/api/inference/", body, content_type="application/json"
    )

    assert response.status_code == 400
    assert "depth limit exceeded" in response.json()["detail"]
    unchanged()


def test_unknown_return_format_rejected(world):
    body = {"model_id": str(world.model.pk), "model_input": [[1, 2, 3, 4]], "return_format": "xml"}

    response = client_for(world.actor).post("/api/inference/", body, format="json")

    assert response.status_code == 400
    assert "return_format 'xml' is invalid; use 'json' or 'binary'" in response.json()["detail"]


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (tensor_file(torch.zeros(2, 7)), 400, "has shape [2, 7]"),
        (tensor_file(torch.full((2, 4), float("nan"))), 400, "contains NaN or infinity"),
        (tensor_file(torch.full((2, 4), float("inf"))), 400, "contains NaN or infinity"),
        (io.BytesIO(state_dict_bytes(tiny_state())), 400, "contains a dict, not a single tensor"),
        (io.BytesIO(b"1,2,3,4"), 400, "is not a PNG or JPEG image, a serialized tensor"),
        # The model runs in float32; the forward pass fails on other dtypes, and the message
        # names the dtype.
        (tensor_file(torch.zeros(2, 4, dtype=torch.int64)), 422, "(torch.int64)"),
        (tensor_file(torch.zeros(2, 4, dtype=torch.bool)), 422, "(torch.bool)"),
        (tensor_file(torch.zeros(2, 4, dtype=torch.complex64)), 422, "(torch.complex64)"),
    ],
    ids=["shape", "NaN", "infinity", "state dict", "text", "int64", "bool", "complex"],
)
def test_file_input_rejected(world, unchanged, content, status, fragment):
    content.name = "input.pt"
    unchanged()

    response = client_for(world.actor).post(
        "/api/inference/",
        {"model_id": str(world.model.pk), "model_input": content},
        format="multipart",
    )

    assert response.status_code == status
    assert fragment in response.json()["detail"]
    unchanged()


def test_shape_message_names_expected_shape(world):
    body = {"model_id": str(world.model.pk), "model_input": [[1, 2, 3]]}

    response = client_for(world.actor).post("/api/inference/", body, format="json")

    assert SHAPE_MESSAGE in response.json()["detail"]
