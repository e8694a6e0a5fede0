"""POST /api/inference/: inputs, responses, methods, errors and permissions."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from fedserve import inference, modelstore
from fedserve.core.models import Model, ModelKind
from tests.factories import client_for, make_training, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("model_store")]

URL = "/api/inference/"


@pytest.fixture(autouse=True)
def _fresh_cache():
    inference.cache.clear()
    yield
    inference.cache.clear()


# Models with known weights


def linear(weight, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


class DropoutClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(4, 32)
        self.dropout = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


class Duplicate(torch.nn.Module):
    """Preprocessing that repeats each row's features: [n, 2] becomes [n, 4]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1)


class RejectNegative(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("inputs must not be negative")
        return x


class Infinite(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 0.0


def script_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def store_model(owner, module=None, *, kind=ModelKind.GLOBAL, input_shape=None, **fields):
    """Create a global model row with `module` stored as a TorchScript file."""
    model = Model.objects.create(
        owner=owner, kind=kind, name="m", description="d", input_shape=input_shape, **fields
    )
    if module is not None:
        model.weights_path = modelstore.save(
            modelstore.model_file_path(model.pk, "weights.pt"), ContentFile(script_bytes(module))
        )
        model.weights_format = "torchscript"
        model.save()
    return model


def set_file(model, field, content: bytes, fmt_field=None, fmt=None):
    path = modelstore.save(modelstore.model_file_path(model.pk, field), ContentFile(content))
    setattr(model, field, path)
    if fmt_field:
        setattr(model, fmt_field, fmt)
    model.save()


def post_json(user, body):
    return client_for(user).post(URL, body, format="json")


def post_file(user, model, content: bytes, name="input.bin", **fields):
    data = {
        "model_id": str(model.pk),
        "model_input": SimpleUploadedFile(name, content),
        **fields,
    }
    return client_for(user).post(URL, data, format="multipart")


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def echo_model(owner, input_shape=None):
    """A model whose output is its input flattened per row, to check decoded inputs."""
    return store_model(owner, torch.nn.Flatten(), input_shape=input_shape)


# Answers


def test_inference_json_single_pass():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0, 3.0, 4.0]], [0.5]), input_shape=[None, 4])

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 1, 1, 1]]})

    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"inference": [[10.5]], "uncertainty": {}}


def test_inference_mc_dropout_values():
    owner = make_user()
    model = store_model(owner, DropoutClassifier(), input_shape=[None, 4])
    make_training(
        owner,
        [],
        model=model,
        uncertainty_method="MC_DROPOUT",
        options={"uncertainty": {"N": 7, "softmax": True}},
    )

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 2, 3, 4]] * 2})

    assert response.status_code == 200, response.content
    body = response.json()
    uncertainty = body["uncertainty"]
    assert set(uncertainty) == {
        "variance",
        "std",
        "predictive_entropy",
        "expected_entropy",
        "mutual_info",
    }
    assert sum(body["inference"][0]) == pytest.approx(1.0, abs=1e-5)
    assert all(value > 0 for value in uncertainty["variance"][0])
    assert len(uncertainty["predictive_entropy"]) == 2
    assert uncertainty["mutual_info"][0] == pytest.approx(
        uncertainty["predictive_entropy"][0] - uncertainty["expected_entropy"][0], abs=1e-6
    )


def test_inference_seed_repeats_mc_dropout_samples():
    owner = make_user()
    model = store_model(owner, DropoutClassifier(), input_shape=[None, 4])
    make_training(owner, [], model=model, uncertainty_method="MC_DROPOUT")
    body = {"model_id": str(model.pk), "model_input": [[1, 2, 3, 4]] * 3}

    first = post_json(owner, {**body, "seed": 7}).json()
    second = post_json(owner, {**body, "seed": 7}).json()
    other = post_json(owner, {**body, "seed": 8}).json()

    assert first == second
    assert first["uncertainty"]["variance"] != other["uncertainty"]["variance"]


def test_inference_none_with_softmax_returns_probabilities():
    owner = make_user()
    model = store_model(owner, linear([[0.0, 0.0], [0.0, math.log(3)]], [0.0, 0.0]))
    make_training(owner, [], model=model, options={"uncertainty": {"softmax": True}})

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[0, 1]]})

    assert response.status_code == 200, response.content
    assert response.json()["inference"][0] == pytest.approx([0.25, 0.75])
    assert response.json()["uncertainty"] == {}


def test_inference_binary_loads_weights_only():
    owner = make_user()
    model = store_model(owner, DropoutClassifier())
    make_training(owner, [], model=model, uncertainty_method="MC_DROPOUT")
    body = {"model_id": str(model.pk), "model_input": [[1, 2, 3, 4]], "return_format": "binary"}

    response = post_json(owner, body)

    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/octet-stream"
    result = torch.load(io.BytesIO(response.content), weights_only=True)
    assert set(result) == {"inference", "variance", "std"}
    assert result["inference"].shape == (1, 3)
    assert torch.equal(result["std"], result["variance"].sqrt())


def test_inference_binary_multipart_field():
    owner = make_user()
    model = echo_model(owner)

    response = post_file(owner, model, tensor_bytes(torch.ones(1, 3)), return_format="binary")

    assert response.status_code == 200, response.content
    result = torch.load(io.BytesIO(response.content), weights_only=True)
    assert result["inference"].tolist() == [[1.0, 1.0, 1.0]]


def test_inference_float64_model_takes_json():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 1.0]], [0.0]).double())

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[0.25, 0.5]]})

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[0.75]]


def test_inference_mean_model_is_exact_ensemble():
    # Members x·(1, 2) + 0.5 and x·(3, -1) - 0.5 on rows (1, 1) and (2, 0) give 3.5, 2.5
    # and 1.5, 5.5: means 2.5 and 4.0, population variances 1 and 2.25.
    owner = make_user()
    first = store_model(owner, linear([[1.0, 2.0]], [0.5]))
    second = store_model(owner, linear([[3.0, -1.0]], [-0.5]))
    mean = store_model(owner, kind=ModelKind.MEAN, input_shape=[None, 2])
    mean.members.set([first, second])

    response = post_json(owner, {"model_id": str(mean.pk), "model_input": [[1, 1], [2, 0]]})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["inference"] == [[2.5], [4.0]]
    assert body["uncertainty"]["variance"] == [[1.0], [2.25]]
    assert body["uncertainty"]["std"] == [[1.0], [1.5]]


def test_inference_nested_mean_model_expands_members():
    owner = make_user()
    first = store_model(owner, linear([[1.0, 2.0]], [0.5]))
    second = store_model(owner, linear([[3.0, -1.0]], [-0.5]))
    inner = store_model(owner, kind=ModelKind.MEAN)
    inner.members.set([second])
    outer = store_model(owner, kind=ModelKind.MEAN)
    outer.members.set([first, inner])

    response = post_json(owner, {"model_id": str(outer.pk), "model_input": [[1, 1]]})

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[2.5]]


def test_inference_mean_model_without_members_409():
    owner = make_user()
    mean = store_model(owner, kind=ModelKind.MEAN)

    response = post_json(owner, {"model_id": str(mean.pk), "model_input": [[1, 1]]})

    assert response.status_code == 409
    assert "no member models" in response.json()["detail"]


def test_inference_swag_without_moments_409():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0]], [0.0]), kind=ModelKind.SWAG)
    make_training(owner, [], model=model, uncertainty_method="SWAG")

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 1]]})

    assert response.status_code == 409
    assert "moments are not aggregated yet" in response.json()["detail"]


def test_inference_swag_samples_weights():
    # Parameters (w0, w1, b) with means (1, 2, 3) and variances (0.25, 0.25, 0.25): on
    # input (1, 0) the output is w0 + b, mean 4 and variance 0.5.
    owner = make_user()
    model = store_model(owner, linear([[0.0, 0.0]], [0.0]), kind=ModelKind.SWAG)
    first = torch.tensor([1.0, 2.0, 3.0])
    set_file(model, "swag_first_moment_path", tensor_bytes(first))
    set_file(model, "swag_second_moment_path", tensor_bytes(first**2 + 0.25))
    make_training(
        owner, [], model=model, uncertainty_method="SWAG", options={"uncertainty": {"N": 400}}
    )

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 0]]})

    assert response.status_code == 200, response.content
    body = response.json()
    # Standard error of the mean over 400 samples: sqrt(0.5 / 400) = 0.035.
    assert body["inference"][0][0] == pytest.approx(4.0, abs=0.18)
    assert body["uncertainty"]["variance"][0][0] == pytest.approx(0.5, rel=0.3)


def test_inference_swag_moments_of_wrong_size_409():
    owner = make_user()
    model = store_model(owner, linear([[0.0, 0.0]], [0.0]), kind=ModelKind.SWAG)
    set_file(model, "swag_first_moment_path", tensor_bytes(torch.zeros(5)))
    set_file(model, "swag_second_moment_path", tensor_bytes(torch.ones(5)))
    make_training(owner, [], model=model, uncertainty_method="SWAG")

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 0]]})

    assert response.status_code == 422
    assert "5 values but the model has 3" in response.json()["detail"]


def test_inference_preprocessing_applied():
    # [1, 2] becomes [1, 2, 1, 2]; the weights (1, 2, 3, 4) give 1 + 4 + 3 + 8 = 16.
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0, 3.0, 4.0]], [0.0]), input_shape=[None, 4])
    set_file(
        model,
        "preprocessing_path",
        script_bytes(Duplicate()),
        "preprocessing_format",
        "torchscript",
    )

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 2]]})

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[16.0]]


def test_inference_preprocessing_failure_422():
    owner = make_user()
    model = store_model(owner, torch.nn.Identity())
    set_file(
        model,
        "preprocessing_path",
        script_bytes(RejectNegative()),
        "preprocessing_format",
        "torchscript",
    )

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[-1.0]]})

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "preprocessing module" in detail
    assert "inputs must not be negative" in detail


def test_inference_cache_avoids_reloading(monkeypatch):
    owner = make_user()
    model = store_model(owner, linear([[1.0]], [0.0]))
    opened = []
    original_open = inference.modelstore.open_file

    def counting_open(path):
        opened.append(path)
        return original_open(path)

    monkeypatch.setattr(inference.modelstore, "open_file", counting_open)
    body = {"model_id": str(model.pk), "model_input": [[2.0]]}

    first = post_json(owner, body)
    second = post_json(owner, body)

    assert first.json()["inference"] == [[2.0]]
    assert second.json()["inference"] == [[2.0]]
    assert opened == [model.weights_path]


def test_inference_cache_reloads_new_weights():
    owner = make_user()
    model = store_model(owner, linear([[1.0]], [0.0]))
    body = {"model_id": str(model.pk), "model_input": [[2.0]]}
    assert post_json(owner, body).json()["inference"] == [[2.0]]

    model.weights_path = modelstore.save(
        modelstore.model_file_path(model.pk, "weights-2.pt"),
        ContentFile(script_bytes(linear([[3.0]], [0.0]))),
    )
    model.save()

    assert post_json(owner, body).json()["inference"] == [[6.0]]


# Input formats


def test_inference_multipart_tensor_file():
    owner = make_user()
    model = echo_model(owner, input_shape=[None, 3])

    response = post_file(owner, model, tensor_bytes(torch.tensor([[1.0, 2.0, 3.0]])))

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[1.0, 2.0, 3.0]]


def test_inference_multipart_safetensors_file():
    owner = make_user()
    model = echo_model(owner)
    content = safetensors.torch.save({"input": torch.tensor([[0.5, -0.5]])})

    response = post_file(owner, model, content, name="input.safetensors")

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[0.5, -0.5]]


def test_inference_multipart_integer_tensor_keeps_dtype():
    # An embedding takes token ids, so an int64 input must reach it unchanged.
    owner = make_user()
    embedding = torch.nn.Embedding(5, 2)
    model = store_model(owner, embedding)
    token_ids = torch.tensor([[0, 4]])
    with torch.no_grad():
        expected = embedding(token_ids).tolist()

    response = post_file(owner, model, tensor_bytes(token_ids))

    assert response.status_code == 200, response.content
    # JSON carries float32 values with the fewest digits that read back the same.
    inference = torch.tensor(response.json()["inference"], dtype=torch.float32)
    assert inference.tolist() == expected


def test_inference_multipart_png_rgb():
    # Pixels red, green / blue, (51, 102, 204): channels first, scaled to [0, 1].
    owner = make_user()
    model = echo_model(owner, input_shape=[1, 3, 2, 2])
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [51, 102, 204]]], dtype=np.uint8)

    response = post_file(owner, model, png_bytes(pixels), name="input.png")

    assert response.status_code == 200, response.content
    red, green, blue = [0, 1, 2]
    expected = [[1, 0, 0, 0.2], [0, 1, 0, 0.4], [0, 0, 1, 0.8]]
    flat = response.json()["inference"][0]
    assert flat[0:4] == pytest.approx(expected[red])
    assert flat[4:8] == pytest.approx(expected[green])
    assert flat[8:12] == pytest.approx(expected[blue])


def test_inference_multipart_png_grayscale():
    owner = make_user()
    model = echo_model(owner, input_shape=[1, 1, 1, 2])

    response = post_file(owner, model, png_bytes(np.array([[0, 255]], dtype=np.uint8)))

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[0.0, 1.0]]


def test_inference_multipart_png_16_bit():
    owner = make_user()
    model = echo_model(owner, input_shape=[1, 1, 1, 2])
    content = png_bytes(np.array([[0, 65535]], dtype=np.uint16))

    response = post_file(owner, model, content)

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[0.0, 1.0]]


def test_inference_multipart_jpeg():
    owner = make_user()
    model = echo_model(owner, input_shape=[1, 3, 8, 8])
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(buffer, format="JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255

    response = post_file(owner, model, buffer.getvalue(), name="input.jpg")

    assert response.status_code == 200, response.content
    expected = decoded.transpose(2, 0, 1).reshape(-1).tolist()
    assert response.json()["inference"][0] == pytest.approx(expected)
    assert response.json()["inference"][0][0] == pytest.approx(128 / 255, abs=3 / 255)


def test_inference_multipart_base64_tensor():
    owner = make_user()
    model = echo_model(owner)
    content = base64.b64encode(tensor_bytes(torch.tensor([[4.0, 5.0]])))

    response = post_file(owner, model, content, name="input.b64")

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[4.0, 5.0]]


def test_inference_multipart_base64_png():
    owner = make_user()
    model = echo_model(owner, input_shape=[1, 1, 1, 2])
    content = base64.b64encode(png_bytes(np.array([[255, 0]], dtype=np.uint8)))

    response = post_file(owner, model, content)

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[1.0, 0.0]]


def test_inference_json_base64_data_url():
    owner = make_user()
    model = echo_model(owner)
    encoded = base64.b64encode(png_bytes(np.array([[0, 255]], dtype=np.uint8))).decode()

    response = post_json(
        owner,
        {"model_id": str(model.pk), "model_input": f"data:image/png;base64,{encoded}"},
    )

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[0.0, 1.0]]


def test_inference_multipart_text_field_list():
    owner = make_user()
    model = echo_model(owner)

    response = client_for(owner).post(
        URL, {"model_id": str(model.pk), "model_input": "[[1, 2]]"}, format="multipart"
    )

    assert response.status_code == 200, response.content
    assert response.json()["inference"] == [[1.0, 2.0]]


# Errors


def test_inference_shape_mismatch_names_both_shapes():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0, 3.0, 4.0]], [0.0]), input_shape=[None, 4])

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 2, 3]]})

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "[1, 3]" in detail
    assert "[null, 4]" in detail


def test_inference_shape_mismatch_after_preprocessing():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0, 3.0, 4.0]], [0.0]), input_shape=[None, 4])
    set_file(
        model,
        "preprocessing_path",
        script_bytes(Duplicate()),
        "preprocessing_format",
        "torchscript",
    )

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 2, 3, 4]]})

    assert response.status_code == 400
    assert "[1, 8] after preprocessing" in response.json()["detail"]


def test_inference_shape_mismatch_rank():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0]], [0.0]), input_shape=[None, 2])

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [1, 2]})

    assert response.status_code == 400
    assert "[2]" in response.json()["detail"]


def test_inference_forward_failure_422():
    owner = make_user()
    model = store_model(owner, linear([[1.0, 2.0, 3.0, 4.0]], [0.0]))

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 2, 3]]})

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "mat1 and mat2 shapes cannot be multiplied" in detail
    assert "Traceback" not in detail


def test_inference_model_exception_message_422():
    owner = make_user()
    model = store_model(owner, RejectNegative())

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[-1.0]]})

    assert response.status_code == 422
    assert "inputs must not be negative" in response.json()["detail"]


def test_inference_non_finite_output_422():
    owner = make_user()
    model = store_model(owner, Infinite())

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1.0]]})

    assert response.status_code == 422
    assert "non-finite" in response.json()["detail"]


def test_inference_weights_only_model_409():
    owner = make_user()
    model = store_model(owner)
    set_file(
        model,
        "weights_path",
        tensor_bytes_dict({"weight": torch.ones(1, 2)}),
        "weights_format",
        "state_dict",
    )

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[1, 1]]})

    assert response.status_code == 409
    assert "architecture" in response.json()["detail"]


def tensor_bytes_dict(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def test_inference_unknown_model_404():
    owner = make_user()

    response = post_json(
        owner,
        {"model_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "model_input": [[1.0]]},
    )

    assert response.status_code == 404
    assert "3fa85f64-5717-4562-b3fc-2c963f66afa6" in response.json()["detail"]


MISSING = object()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model_id": MISSING, "model_input": [[1.0]]}, "model_id is missing"),
        ({"model_id": "seven", "model_input": [[1.0]]}, "'seven' is not a valid UUID"),
        ({"model_input": MISSING}, "model_input is missing"),
        ({"model_input": [[1.0, 2.0], [3.0]]}, "rectangular"),
        ({"model_input": [["a"]]}, "contains str 'a'"),
        ({"model_input": [[1.0, None]]}, "contains NoneType None"),
        ({"model_input": [[10**40]]}, "NaN or infinity"),
        ({"model_input": {"x": 1}}, "nested list"),
        ({"model_input": [[1e40]]}, "NaN or infinity"),
        ({"model_input": "not base64!"}, "not valid base64"),
        ({"model_input": [[1.0]], "return_format": "xml"}, "'xml' is invalid"),
        ({"model_input": [[1.0]], "seed": -1}, "seed -1 is invalid"),
        ({"model_input": [[1.0]], "seed": "abc"}, "seed 'abc' is invalid"),
        ({"model_input": [[1.0]], "seed": 1.5}, "seed 1.5 is invalid"),
        ({"model_input": [[1.0]], "seed": True}, "seed True is invalid"),
    ],
    ids=[
        "no-model-id",
        "bad-uuid",
        "no-input",
        "ragged",
        "string",
        "null",
        "huge-int",
        "object",
        "overflow",
        "bad-base64",
        "bad-format",
        "negative-seed",
        "text-seed",
        "fractional-seed",
        "boolean-seed",
    ],
)
def test_inference_invalid_request_400(body, message):
    owner = make_user()
    model = echo_model(owner)
    body = {"model_id": str(model.pk), **body}
    body = {name: value for name, value in body.items() if value is not MISSING}

    response = post_json(owner, body)

    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_inference_body_not_object_400():
    owner = make_user()

    response = client_for(owner).post(URL, [1, 2], format="json")

    assert response.status_code == 400
    assert "JSON object" in response.json()["detail"]


def test_inference_malformed_json_400():
    owner = make_user()

    response = client_for(owner).post(URL, b'{"model_id": ', content_type="application/json")

    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]


def test_inference_json_body_over_limit_413(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    owner = make_user()
    model = echo_model(owner)

    response = post_json(owner, {"model_id": str(model.pk), "model_input": [[0.5] * 400]})

    assert response.status_code == 413
    assert "multipart" in response.json()["detail"]


def test_inference_file_over_limit_413(settings):
    settings.FEDSERVE_MAX_UPLOAD_BYTES = 1024
    owner = make_user()
    model = echo_model(owner)

    response = post_file(owner, model, tensor_bytes(torch.zeros(4000)))

    assert response.status_code == 413


def test_inference_unreadable_file_400():
    owner = make_user()
    model = echo_model(owner)

    response = post_file(owner, model, b"this is plain text, not a tensor")

    assert response.status_code == 400
    assert "not a PNG or JPEG image, a serialized tensor" in response.json()["detail"]


def test_inference_truncated_png_400():
    owner = make_user()
    model = echo_model(owner)
    content = png_bytes(np.zeros((16, 16), dtype=np.uint8))[:40]

    response = post_file(owner, model, content)

    assert response.status_code == 400
    assert "not a readable PNG or JPEG image" in response.json()["detail"]


class Payload:
    """An arbitrary Python object, which a weights-only load must not unpickle."""


def test_inference_pickle_input_rejected():
    owner = make_user()
    model = echo_model(owner)
    buffer = io.BytesIO()
    torch.save({"x": Payload()}, buffer)

    response = post_file(owner, model, buffer.getvalue())

    assert response.status_code == 400
    assert "Payload" in response.json()["detail"]


# Permissions


@pytest.mark.parametrize("role", ["owner", "actor", "participant"])
def test_inference_allowed_roles(role):
    owner, actor, participant = make_user(), make_user(), make_user()
    model = store_model(owner, linear([[1.0]], [0.0]))
    make_training(actor, [participant], model=model)
    caller = {"owner": owner, "actor": actor, "participant": participant}[role]

    response = post_json(caller, {"model_id": str(model.pk), "model_input": [[1.0]]})

    assert response.status_code == 200, response.content


def test_inference_unrelated_user_403():
    owner = make_user()
    model = store_model(owner, linear([[1.0]], [0.0]))
    make_training(owner, [make_user()], model=model)

    response = post_json(make_user(), {"model_id": str(model.pk), "model_input": [[1.0]]})

    assert response.status_code == 403


def test_inference_anonymous_401():
    model = store_model(make_user(), linear([[1.0]], [0.0]))

    response = post_json(None, {"model_id": str(model.pk), "model_input": [[1.0]]})

    assert response.status_code == 401


# Schema


def test_inference_schema_documents_operation():
    schema = client_for(None).get("/api/schema/", {"format": "json"}).json()
    operation = schema["paths"]["/api/inference/"]["post"]

    assert {int(code) for code in operation["responses"]} == {
        200,
        400,
        401,
        403,
        404,
        409,
        413,
        422,
    }
    assert set(operation["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
    }
    assert set(operation["responses"]["200"]["content"]) == {
        "application/json",
        "application/octet-stream",
    }
    # A single forward pass returns an empty uncertainty object, so no field is required.
    assert "required" not in schema["components"]["schemas"]["Uncertainty"]
