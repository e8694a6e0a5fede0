"""Inference on stored models: decode the input, preprocess, check its shape, sample, summarize.

The uncertainty method comes from the model. A MEAN model always predicts as an ensemble
of its members. Any other model uses its training's `uncertainty_method` and
`options["uncertainty"]` (`N` samples, `softmax`), or one plain forward pass when it has
no training.

Loaded modules, preprocessing modules and SWAG posteriors are kept in a small LRU cache
per model, so repeated requests do not read the model store again. A cached entry is
reloaded when the model row changes (`updated_at`) or points at another file. A module
copy is used by one request at a time, because MC dropout switches its layers' modes and
SWAG writes sampled weights into it (see ModulePool).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedserve import config, modelfiles, modelstore
from fedserve.core.models import Model, ModelKind, UncertaintyMethod
from fedserve.rounds.options import OptionsError, TrainingOptions, UncertaintyOptions
from fedserve.uncertainty import UncertaintyError, ensemble, mc_dropout, none, summarize, swag

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

# Cached entries (modules, preprocessing modules, SWAG posteriors) kept per process.
CACHE_ENTRIES = config.env_int("FEDSERVE_INFERENCE_CACHE_ENTRIES", 16, minimum=1)


class InferenceError(Exception):
    """Base class of the errors a caller can cause; the message names the fix."""


class InvalidInput(InferenceError):
    """The input cannot be decoded or does not fit the model (HTTP 400)."""


class ModelNotReady(InferenceError):
    """The model cannot predict in its current state (HTTP 409)."""


class PredictionFailed(InferenceError):
    """The model's preprocessing or forward pass failed on this input (HTTP 422)."""


# Input decoding


def tensor_from_json(value: Any) -> torch.Tensor:
    """Turn a JSON `model_input` (nested lists of numbers) into a float32 tensor.

    A string is read as base64 of an image or a serialized tensor.
    """
    if isinstance(value, str):
        return tensor_from_bytes(_decode_base64(value.encode("ascii", "replace")))
    if not isinstance(value, list):
        raise InvalidInput(
            f"model_input must be a nested list of numbers such as [[0.1, 0.2]], not "
            f"{type(value).__name__} {_preview(value)}."
        )
    # numpy reads nested lists about twice as fast as torch.tensor does.
    try:
        array = np.array(value)
    except (ValueError, OverflowError) as error:
        raise InvalidInput(
            "model_input must be a rectangular nested list of numbers (every inner list of "
            f"the same length): {error}."
        ) from None
    if array.dtype.kind not in "biuf":
        # Strings, nulls and objects, or integers too large for int64 (kept as objects).
        example = _first_non_number(array)
        if example is not None:
            raise InvalidInput(
                f"model_input must contain only numbers, but it contains {example}; send a "
                "nested list of numbers."
            )
        array = array.astype(np.float64)
    with np.errstate(over="ignore"):
        tensor = torch.from_numpy(array.astype(np.float32))
    _check_finite(tensor)
    return tensor


def _first_non_number(array: np.ndarray) -> str | None:
    for item in array.reshape(-1).tolist():
        if not isinstance(item, int | float):
            return f"{type(item).__name__} {_preview(item)}"
    return None


def tensor_from_upload(upload: IO[bytes]) -> torch.Tensor:
    """Turn an uploaded `model_input` file into a tensor.

    Accepted: a PNG or JPEG image; a tensor saved with torch.save (read weights-only) or as
    a one-tensor safetensors file; base64 of any of these.
    """
    upload.seek(0)
    head = upload.read(8)
    upload.seek(0)
    if head.startswith(PNG_SIGNATURE) or head.startswith(JPEG_SIGNATURE):
        return image_to_tensor(upload)
    try:
        tensor = modelfiles.load_tensor(upload)
    except modelfiles.ModelFileError as tensor_error:
        upload.seek(0)
        decoded = _try_base64(upload.read())
        if decoded is None:
            raise InvalidInput(
                "model_input is not a PNG or JPEG image, a serialized tensor, or base64 of "
                f"either. As a tensor file: {tensor_error.problem} Send an image, a "
                "torch.save(tensor) file or a one-tensor safetensors file."
            ) from None
        return tensor_from_bytes(decoded)
    _check_finite(tensor)
    return tensor


def tensor_from_bytes(data: bytes) -> torch.Tensor:
    """Turn decoded base64 content (an image or a serialized tensor) into a tensor."""
    if data.startswith(PNG_SIGNATURE) or data.startswith(JPEG_SIGNATURE):
        return image_to_tensor(io.BytesIO(data))
    try:
        tensor = modelfiles.load_tensor(data)
    except modelfiles.ModelFileError as error:
        raise InvalidInput(
            "model_input is base64, but the decoded bytes are neither a PNG or JPEG image nor "
            f"a serialized tensor: {error.problem}"
        ) from None
    _check_finite(tensor)
    return tensor


def image_to_tensor(fileobj: IO[bytes]) -> torch.Tensor:
    """Decode a PNG or JPEG image into a float tensor `[1, channels, height, width]` in [0, 1].

    Grayscale gives 1 channel, RGB 3 and images with alpha 2 or 4. Palette images become
    RGB (RGBA with transparency), CMYK and YCbCr become RGB. 16-bit grayscale is divided
    by 65535, 8-bit channels by 255.
    """
    try:
        with warnings.catch_warnings():
            # The size is checked below with a clear message instead of Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fileobj)
            if image.format not in ("PNG", "JPEG"):
                raise InvalidInput(
                    f"model_input is a {image.format} image; send a PNG or JPEG image."
                )
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS or 0
            if limit and width * height > limit:
                raise InvalidInput(
                    f"model_input is a {width}x{height} image, more than the {limit} pixels "
                    "this server decodes; send a smaller image."
                )
            image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as error:
        raise InvalidInput(f"model_input is not a readable PNG or JPEG image: {error}.") from None

    array, scale = _image_array(image)
    tensor = torch.from_numpy(array).to(torch.float32) / scale
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(-1)
    return tensor.permute(2, 0, 1).unsqueeze(0).contiguous()


def _image_array(image: Image.Image) -> tuple[np.ndarray, float]:
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.array(image), 255.0
    if mode.startswith("I;16") or mode == "I":
        # PNG stores at most 16 bits per sample; Pillow opens 16-bit grayscale as I;16 or I.
        return np.array(image).astype(np.int32), 65535.0
    if mode == "1":
        return np.array(image.convert("L")), 255.0
    if mode == "P":
        target = "RGBA" if "transparency" in image.info else "RGB"
        return np.array(image.convert(target)), 255.0
    return np.array(image.convert("RGB")), 255.0


def _try_base64(data: bytes) -> bytes | None:
    try:
        return _decode_base64(data)
    except InvalidInput:
        return None


def _decode_base64(data: bytes) -> bytes:
    text = b"".join(data.split())
    if text.startswith(b"data:") and b"base64," in text:
        # A data URL such as data:image/png;base64,iVBOR...
        text = text.split(b"base64,", 1)[1]
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            "model_input is a string but not valid base64; send base64 of an image or a "
            "serialized tensor, or a nested list of numbers."
        ) from None
    if not decoded:
        raise InvalidInput("model_input is empty; send an image, a tensor or a nested list.")
    return decoded


def _check_finite(tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidInput(
            "model_input contains NaN or infinity (a number beyond ±3.4e38 does not fit "
            "float32); send finite numbers."
        )


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Runtime settings


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Per-process compute settings: torch threads per request and module replicas per model."""

    torch_threads: int
    replicas: int


_runtime_lock = threading.Lock()
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """Read the compute settings and set torch's intra-op threads, once per process.

    FEDSERVE_TORCH_THREADS (default 1) is the number of threads one request's forward
    passes use. FEDSERVE_INFERENCE_REPLICAS (default: the CPUs this process may run on,
    divided by the torch threads) is how many requests may run one model at the same
    time, each on its own copy of the module. The defaults spread a threaded server's
    requests over the cores instead of splitting each request over them. On a shared
    2-core machine, two threads per request made the forward passes 10 to 30 times slower
    while other processes kept the cores busy (docs/benchmarks.md, "Inference").
    """
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            threads = config.env_int("FEDSERVE_TORCH_THREADS", 1, minimum=1)
            replicas = config.env_int(
                "FEDSERVE_INFERENCE_REPLICAS", max(cpus // threads, 1), minimum=1
            )
            torch.set_num_threads(threads)
            _runtime = Runtime(torch_threads=threads, replicas=replicas)
            logger.info(
                "inference uses %d torch threads per request and up to %d module replicas "
                "per model",
                threads,
                replicas,
            )
        return _runtime


# Cache of loaded modules


class ModulePool:
    """Copies of one loaded module, each used by one request at a time.

    MC dropout switches layer modes and SWAG writes sampled weights into the module, so
    a request needs a copy of its own. The first copy is loaded with the pool. More are
    loaded from the model store on demand, up to `max_replicas`. A request waits while
    all of them are in use.
    """

    def __init__(
        self, load: Callable[[], torch.nn.Module], first: torch.nn.Module, max_replicas: int
    ) -> None:
        self._load = load
        self._free = [first]
        self._count = 1
        self._max_replicas = max_replicas
        self._condition = threading.Condition()

    @property
    def replicas(self) -> int:
        with self._condition:
            return self._count

    @contextlib.contextmanager
    def lease(self) -> Iterator[torch.nn.Module]:
        """Lend a module copy to the caller for the duration of the `with` block."""
        with self._condition:
            while not self._free and self._count >= self._max_replicas:
                self._condition.wait()
            module = self._free.pop() if self._free else None
            if module is None:
                self._count += 1
        if module is None:
            try:
                module = self._load()
            except BaseException:
                with self._condition:
                    self._count -= 1
                    self._condition.notify()
                raise
        try:
            yield module
        finally:
            with self._condition:
                self._free.append(module)
                self._condition.notify()


class LRUCache:
    """A thread-safe LRU map from (kind, model id) to a value loaded for one file version.

    Loading happens outside the lock, so a slow load does not block requests for other
    models. Two requests that miss at once may both load; the second result is kept.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[tuple[str, str], tuple[Any, Any]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], version: Any, load: Callable[[], Any]) -> Any:
        """Return the cached value for `key` at `version`, loading it on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == version:
                self._entries.move_to_end(key)
                return entry[1]
        value = load()
        with self._lock:
            self._entries[key] = (version, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


cache = LRUCache(CACHE_ENTRIES)


def _load_module(model: Model, path: str, fmt: str, file_role: str) -> torch.nn.Module:
    started = time.perf_counter()
    try:
        with modelstore.open_file(path) as handle:
            module = modelfiles.load_module(handle, fmt or None, map_location="cpu")
    except modelfiles.ModelFileError as error:
        raise ModelNotReady(f"The {file_role} of model {model.pk} cannot be run: {error}") from None
    except FileNotFoundError:
        raise ModelNotReady(
            f"The {file_role} of model {model.pk} is missing from the model store; upload it again."
        ) from None
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    logger.info(
        "loaded the %s of model %s for inference in %.2f s",
        file_role,
        model.pk,
        time.perf_counter() - started,
    )
    return module


def _pool(model: Model, path: str, fmt: str, file_role: str) -> ModulePool:
    def load() -> torch.nn.Module:
        return _load_module(model, path, fmt, file_role)

    return ModulePool(load, load(), runtime().replicas)


def module_pool(model: Model) -> ModulePool:
    """Return the pool of the model's runnable module, loading it on the first request."""
    if not model.weights_path:
        raise ModelNotReady(
            f"Model {model.pk} ({model.kind}) has no weights file, so it cannot predict."
        )
    return cache.get(
        ("module", str(model.pk)),
        (model.weights_path, model.updated_at),
        lambda: _pool(model, model.weights_path, model.weights_format, "model file"),
    )


def preprocessing_pool(model: Model) -> ModulePool:
    """Return the pool of the model's preprocessing module, loading it on the first request."""
    return cache.get(
        ("preprocessing", str(model.pk)),
        (model.preprocessing_path, model.updated_at),
        lambda: _pool(
            model, model.preprocessing_path, model.preprocessing_format, "preprocessing module"
        ),
    )


def cached_swag_posterior(model: Model) -> swag.SwagPosterior:
    """Return the SWAG Gaussian of a model from its aggregated moments."""
    if not (model.swag_first_moment_path and model.swag_second_moment_path):
        raise ModelNotReady(
            f"Model {model.pk} uses SWAG, but its moments are not aggregated yet; wait until "
            "the training's SWAG round has finished."
        )

    def load() -> swag.SwagPosterior:
        try:
            with modelstore.open_file(model.swag_first_moment_path) as handle:
                first = modelfiles.load_tensor(handle)
            with modelstore.open_file(model.swag_second_moment_path) as handle:
                second = modelfiles.load_tensor(handle)
            return swag.posterior_from_moments(first, second)
        except (modelfiles.ModelFileError, UncertaintyError, FileNotFoundError) as error:
            raise ModelNotReady(
                f"The SWAG moments of model {model.pk} cannot be used: {error}"
            ) from None

    return cache.get(
        ("swag", str(model.pk)),
        (model.swag_first_moment_path, model.swag_second_moment_path, model.updated_at),
        load,
    )


# Prediction


@dataclasses.dataclass(frozen=True)
class Plan:
    """Uncertainty method and options with which a model predicts."""

    method: UncertaintyMethod
    options: UncertaintyOptions


def plan_for(model: Model) -> Plan:
    """Choose the uncertainty method and options of a model."""
    training = model.get_training()
    options = UncertaintyOptions()
    if training is not None:
        try:
            options = TrainingOptions.parse(training.options).uncertainty
        except OptionsError as error:
            raise ModelNotReady(
                f"The options of training {training.pk} are invalid, so model {model.pk} "
                f"cannot predict: {error}"
            ) from None
    if model.kind == ModelKind.MEAN:
        return Plan(UncertaintyMethod.ENSEMBLE, options)
    if training is None:
        return Plan(UncertaintyMethod.NONE, options)
    return Plan(UncertaintyMethod(training.uncertainty_method), options)


def ensemble_members(model: Model) -> list[Model]:
    """Return the models an ensemble runs: a MEAN model's members, nested MEAN models expanded.

    Any other model is an ensemble of itself.
    """
    if model.kind != ModelKind.MEAN:
        return [model]
    members: list[Model] = []
    seen = {model.pk}
    pending = [model]
    while pending:
        for member in pending.pop(0).members.order_by("created_at", "pk"):
            if member.pk in seen:
                continue
            seen.add(member.pk)
            if member.kind == ModelKind.MEAN:
                pending.append(member)
            else:
                members.append(member)
    if not members:
        raise ModelNotReady(
            f"MEAN model {model.pk} has no member models to predict with; create it again "
            "with a non-empty models list."
        )
    return members


def check_input_shape(model: Model, model_input: torch.Tensor, *, preprocessed: bool) -> None:
    """Raise InvalidInput unless the input matches the model's `input_shape`."""
    expected = model.input_shape
    if expected is None:
        return
    actual = list(model_input.shape)
    matches = len(expected) == len(actual) and all(
        size is None or size == actual_size
        for size, actual_size in zip(expected, actual, strict=True)
    )
    if not matches:
        stage = " after preprocessing" if preprocessed else ""
        raise InvalidInput(
            f"model_input has shape {json.dumps(actual)}{stage}, but model {model.pk} expects "
            f"input of shape {json.dumps(expected)} (null is a free dimension); reshape the "
            "input to match."
        )


# Seeded requests take turns, because they reseed torch's process-wide generator.
_seeded_sampling = threading.Lock()


def predict(
    model: Model, model_input: torch.Tensor, *, seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Run the model's preprocessing and uncertainty method on an input.

    Returns `inference` plus the uncertainty values of `fedserve.uncertainty.summary`
    (none for a single forward pass). With a `seed`, the dropout masks and SWAG weight
    samples repeat from request to request.
    """
    runtime()
    plan = plan_for(model)

    if model.preprocessing_path:
        model_input = _preprocess(model, model_input)
    check_input_shape(model, model_input, preprocessed=bool(model.preprocessing_path))

    started = time.perf_counter()
    try:
        if seed is None:
            samples = _sample(model, plan, model_input)
        else:
            # NOTE: an unseeded request that samples at the same time draws from the same
            # generator and can change a seeded request's samples.
            with _seeded_sampling, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                samples = _sample(model, plan, model_input)
    except UncertaintyError as error:
        raise PredictionFailed(
            f"Model {model.pk} failed on model_input of shape {list(model_input.shape)} "
            f"({model_input.dtype}): {error}"
        ) from None
    result = summarize(
        samples,
        softmax=plan.options.softmax,
        spread=plan.method != UncertaintyMethod.NONE,
    )
    logger.debug(
        "model %s predicted with %s (%d samples) in %.1f ms",
        model.pk,
        plan.method,
        samples.shape[0],
        (time.perf_counter() - started) * 1000,
    )
    return result


def _preprocess(model: Model, model_input: torch.Tensor) -> torch.Tensor:
    try:
        with preprocessing_pool(model).lease() as module, torch.inference_mode():
            output = module(model_input)
    except ModelNotReady:
        raise
    except Exception as error:  # preprocessing is model code and may raise any exception type
        raise PredictionFailed(
            f"The preprocessing module of model {model.pk} failed on model_input of shape "
            f"{list(model_input.shape)} ({model_input.dtype}): {error}"
        ) from None
    if not isinstance(output, torch.Tensor):
        raise PredictionFailed(
            f"The preprocessing module of model {model.pk} returned {type(output).__name__}, "
            "but a tensor is needed."
        )
    return output


def _sample(model: Model, plan: Plan, model_input: torch.Tensor) -> torch.Tensor:
    if plan.method == UncertaintyMethod.ENSEMBLE:
        pools = [module_pool(member) for member in ensemble_members(model)]
        with contextlib.closing(_leased_in_turn(pools)) as members:
            first = next(members)
            model_input = _match_dtype(first, model_input)
            return ensemble.sample(itertools.chain([first], members), model_input)

    if plan.method == UncertaintyMethod.SWAG:
        posterior = cached_swag_posterior(model)
        with module_pool(model).lease() as module:
            model_input = _match_dtype(module, model_input)
            return swag.sample(module, model_input, posterior, plan.options.N)

    with module_pool(model).lease() as module:
        model_input = _match_dtype(module, model_input)
        if plan.method == UncertaintyMethod.MC_DROPOUT:
            return mc_dropout.sample(module, model_input, plan.options.N)
        return none.sample(module, model_input)


def _leased_in_turn(pools: list[ModulePool]) -> Generator[torch.nn.Module, None, None]:
    # Each lease lasts until the consumer requests the next module, so an ensemble holds
    # one lease at a time and cannot deadlock with another request that shares members.
    for pool in pools:
        with pool.lease() as module:
            yield module


def _match_dtype(module: torch.nn.Module, model_input: torch.Tensor) -> torch.Tensor:
    """Cast a floating input to the dtype of the module's floating parameters.

    JSON and image inputs arrive as float32, which a float64 model could not take.
    Integer inputs (token ids, for example) are left alone.
    """
    if not model_input.is_floating_point():
        return model_input
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return model_input.to(parameter.dtype)
    return model_input
