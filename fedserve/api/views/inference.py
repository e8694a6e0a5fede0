"""Inference: predictions with uncertainty values from a stored global model."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
import torch
from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.parsers import BaseParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from fedserve import inference
from fedserve.api import permissions
from fedserve.api.errors import Conflict, PayloadTooLarge, UnprocessableEntity
from fedserve.api.serializers.fields import shortened
from fedserve.api.uploads import StreamingMultiPartParser
from fedserve.core.models import Model

RETURN_FORMATS = ("json", "binary")
MAX_SEED = 2**63 - 1


class InferenceJsonRequestSerializer(serializers.Serializer[Any]):
    """JSON body of POST inference/."""

    model_id = serializers.UUIDField(help_text="Id of the model to run.")
    model_input = serializers.JSONField(
        help_text="The input as nested lists of numbers (read as float32), or a base64 string "
        "of an image or a serialized tensor."
    )
    return_format = serializers.ChoiceField(
        choices=RETURN_FORMATS,
        default="json",
        help_text="json: a JSON object; binary: a torch.save file of a dict of tensors.",
    )
    seed = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_SEED,
        help_text="Seed for MC-dropout masks and SWAG weight samples, for repeatable answers.",
    )


class InferenceMultipartRequestSerializer(serializers.Serializer[Any]):
    """Multipart body of POST inference/."""

    model_id = serializers.UUIDField(help_text="Id of the model to run.")
    model_input = serializers.FileField(
        help_text="A PNG or JPEG image (read as float32 in [0, 1], shape [1, channels, "
        "height, width]), a tensor saved with torch.save (read weights-only) or as a "
        "one-tensor safetensors file, or base64 of any of these."
    )
    return_format = serializers.ChoiceField(choices=RETURN_FORMATS, default="json")
    seed = serializers.IntegerField(required=False, min_value=0, max_value=MAX_SEED)


class UncertaintySerializer(serializers.Serializer[Any]):
    """Uncertainty values, each shaped like the output (entropies without the class axis).

    Every field is absent for a single forward pass (uncertainty method NONE).
    """

    variance = serializers.JSONField(
        required=False, help_text="Population variance over the samples."
    )
    std = serializers.JSONField(required=False, help_text="Square root of the variance.")
    predictive_entropy = serializers.JSONField(
        required=False, help_text="Entropy (nats) of the mean probabilities."
    )
    expected_entropy = serializers.JSONField(
        required=False, help_text="Mean of the samples' entropies (nats)."
    )
    mutual_info = serializers.JSONField(
        required=False, help_text="predictive_entropy minus expected_entropy, at least 0."
    )


class InferenceResultSerializer(serializers.Serializer[Any]):
    """JSON response body of POST inference/."""

    inference = serializers.JSONField(help_text="Mean prediction over the samples.")
    uncertainty = UncertaintySerializer(
        help_text="Empty for a single forward pass (uncertainty method NONE)."
    )


class _DetailSerializer(serializers.Serializer[Any]):
    detail = serializers.CharField()


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(response=_DetailSerializer, description=description)


_DESCRIPTION = """Run a model on an input and return the prediction with uncertainty values.

The input goes through the model's preprocessing module, if it has one, and is then
checked against the model's `input_shape`. A MEAN model predicts as an ensemble of its
members. Any other model uses its training's `uncertainty_method` with
`options.uncertainty` (`N` samples, default 10; `softmax`, default false), or one
forward pass when it has no training.

- NONE: one forward pass in eval mode; `uncertainty` is empty.
- ENSEMBLE: one pass per member.
- MC_DROPOUT: N passes with only the dropout layers active.
- SWAG: N passes, each with weights drawn independently from the Gaussian of the
  aggregated moments (standard deviation = square root of second moment minus first
  moment squared).

`inference` is the mean over the samples. `variance` is the population variance (divided
by N) and `std` its square root. When the last output dimension contains probabilities, or
softmax is set, the response adds `predictive_entropy`, `expected_entropy` and
`mutual_info` (natural log). A model output with NaN or infinity is rejected with 422.

With `return_format` binary the response is a `torch.save` file of a dict of tensors
(`inference`, `variance`, ...), readable with `torch.load(f, weights_only=True)`."""


class InferenceJSONParser(BaseParser):
    """JSON parser using orjson, with the body size limited to DATA_UPLOAD_MAX_MEMORY_SIZE.

    orjson reads a batch of full-precision floats several times faster than the standard
    library. The body is read into memory whole, so its size is bounded while reading.
    It derives from BaseParser, not JSONParser, because DRF hands JSONParser subclasses
    Django's `request.body`, whose own limit raises an HTML 400 instead of this 413.
    """

    media_type = "application/json"

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(
                f"The JSON body is larger than {limit} bytes; send model_input as a tensor "
                "file in a multipart form instead."
            )
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise ParseError(f"The request body is not valid JSON: {error}.") from None


class Inference(APIView):
    parser_classes = [InferenceJSONParser, StreamingMultiPartParser]
    renderer_classes = [JSONRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # The answer's format comes from return_format, not from the Accept header, and
        # errors are always JSON.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        summary="Predict with uncertainty",
        description=_DESCRIPTION,
        request={
            "application/json": InferenceJsonRequestSerializer,
            "multipart/form-data": InferenceMultipartRequestSerializer,
        },
        responses={
            (200, "application/json"): InferenceResultSerializer,
            (200, "application/octet-stream"): OpenApiResponse(
                response=OpenApiTypes.BINARY,
                description="With return_format binary: a torch.save file of a dict of "
                "tensors, readable with torch.load(weights_only=True).",
            ),
            400: _error(
                "Missing or invalid model_id, model_input or return_format, or an input "
                "whose shape does not match the model's input_shape."
            ),
            401: _error("Missing or invalid credentials."),
            413: _error(
                "A JSON body or form fields over DATA_UPLOAD_MAX_MEMORY_SIZE (16 MiB by "
                "default), or a file over FEDSERVE_MAX_UPLOAD_BYTES."
            ),
            403: _error("Only the model's owner and its training's actor and participants."),
            404: _error("No model has this model_id."),
            409: _error(
                "The model cannot predict yet: SWAG moments not aggregated, no runnable "
                "file, or a MEAN model without members."
            ),
            422: _error(
                "The model's preprocessing or forward pass failed on this input, or its "
                "output contains NaN or infinity; the message is the model's error."
            ),
        },
        examples=[
            OpenApiExample(
                "Two rows for a 4-feature model",
                request_only=True,
                media_type="application/json",
                value={
                    "model_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
                    "model_input": [[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.5, 0.2]],
                    "return_format": "json",
                },
            ),
            OpenApiExample(
                "MC dropout answer for a classifier",
                response_only=True,
                media_type="application/json",
                value={
                    "inference": [[0.7, 0.3]],
                    "uncertainty": {
                        "variance": [[0.01, 0.01]],
                        "std": [[0.1, 0.1]],
                        "predictive_entropy": [0.6109],
                        "expected_entropy": [0.5867],
                        "mutual_info": [0.0242],
                    },
                },
            ),
        ],
    )
    def post(self, request: Request) -> HttpResponse:
        if not isinstance(request.data, Mapping):
            raise ParseError(
                f"The request body must be a JSON object or a multipart form, not "
                f"{type(request.data).__name__}; send model_id and model_input as fields."
            )
        data: Mapping[str, Any] = request.data
        model_id = _model_id(data.get("model_id"))
        return_format = _return_format(data.get("return_format"))
        seed = _seed(data.get("seed"))
        # The training decides the uncertainty method, so it is fetched in the same query.
        # get(), because first() would add an ORDER BY that a primary-key lookup does not need.
        try:
            model = Model.objects.select_related("training").get(pk=model_id)
        except Model.DoesNotExist:
            raise NotFound(f"Model {model_id} not found; check model_id.") from None
        permissions.require_use_model_for_inference(request.user, model)

        try:
            model_input = _model_input(request, data)
            result = inference.predict(model, model_input, seed=seed)
        except inference.InvalidInput as error:
            raise ParseError(str(error)) from None
        except inference.ModelNotReady as error:
            raise Conflict(str(error)) from None
        except inference.PredictionFailed as error:
            raise UnprocessableEntity(str(error)) from None

        if return_format == "binary":
            return _binary_response(result)
        return _json_response(result)


def _model_id(value: Any) -> uuid.UUID:
    if value in (None, ""):
        raise ParseError("model_id is missing; send the id of the model to run.")
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ParseError(
            f"model_id {shortened(value)} is not a valid UUID; send a model's id."
        ) from None


def _seed(value: Any) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, bool):
        raise ParseError(f"seed {value!r} is invalid; use an integer from 0 to {MAX_SEED}.")
    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise ParseError(
            f"seed {shortened(value)} is invalid; use an integer from 0 to {MAX_SEED}."
        ) from None
    if not 0 <= seed <= MAX_SEED or (isinstance(value, float) and value != seed):
        raise ParseError(f"seed {value!r} is invalid; use an integer from 0 to {MAX_SEED}.")
    return seed


def _return_format(value: Any) -> str:
    if value in (None, ""):
        return "json"
    if isinstance(value, str) and value.lower() in RETURN_FORMATS:
        return value.lower()
    raise ParseError(f"return_format {value!r} is invalid; use 'json' or 'binary'.")


def _model_input(request: Request, data: Mapping[str, Any]) -> torch.Tensor:
    upload = request.FILES.get("model_input")
    if upload is not None:
        return inference.tensor_from_upload(upload)
    value = data.get("model_input")
    if value is None:
        raise inference.InvalidInput(
            "model_input is missing; send it as a nested list in JSON, or as a file in a "
            "multipart form."
        )
    if isinstance(value, str) and value.lstrip().startswith("["):
        # A multipart text field carrying the JSON list.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise inference.InvalidInput(
                f"model_input looks like a JSON list but cannot be parsed: {error}."
            ) from None
    return inference.tensor_from_json(value)


def _json_response(result: dict[str, torch.Tensor]) -> HttpResponse:
    # orjson writes numpy arrays without building a Python float per value, which made
    # json.dumps the slowest step for outputs with thousands of values. A float32 value is
    # written with the fewest digits that read back as the same float32.
    arrays = {name: _as_array(tensor) for name, tensor in result.items()}
    payload = {
        "inference": arrays.pop("inference"),
        "uncertainty": arrays,
    }
    return HttpResponse(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
    )


def _as_array(tensor: torch.Tensor) -> Any:
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    return tensor.detach().contiguous().numpy()


def _binary_response(result: dict[str, torch.Tensor]) -> HttpResponse:
    buffer = io.BytesIO()
    torch.save({name: tensor.clone() for name, tensor in result.items()}, buffer)
    response = HttpResponse(buffer.getvalue(), content_type="application/octet-stream")
    response["Content-Disposition"] = 'attachment; filename="inference.pt"'
    return response
