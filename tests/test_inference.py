"""Domain code of inference: input decoding, the module cache, plans and locking."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from django.core.files.base import ContentFile
from PIL import Image

from fedserve import inference, modelstore
from fedserve.core.models import Model, ModelKind, UncertaintyMethod
from fedserve.rounds.options import UncertaintyOptions
from tests.factories import make_training, make_user


def image_bytes(image: Image.Image, fmt: str = "PNG") -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return buffer


# Images


def test_image_rgba_keeps_alpha_channel():
    image = Image.new("RGBA", (3, 2), (255, 0, 0, 51))

    tensor = inference.image_to_tensor(image_bytes(image))

    assert tensor.shape == (1, 4, 2, 3)
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.2])


def test_image_grayscale_alpha_has_two_channels():
    image = Image.new("LA", (2, 2), (255, 0))

    tensor = inference.image_to_tensor(image_bytes(image))

    assert tensor.shape == (1, 2, 2, 2)
    assert tensor[0, :, 1, 1].tolist() == [1.0, 0.0]


def test_image_palette_becomes_rgb():
    image = Image.new("RGB", (2, 1), (0, 0, 255)).convert("P")

    tensor = inference.image_to_tensor(image_bytes(image))

    assert tensor.shape == (1, 3, 1, 2)
    assert tensor[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_image_bilevel_becomes_grayscale():
    image = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")

    tensor = inference.image_to_tensor(image_bytes(image))

    assert tensor.tolist() == [[[[0.0, 1.0]]]]


def test_image_other_format_rejected():
    with pytest.raises(inference.InvalidInput, match="BMP image"):
        inference.image_to_tensor(image_bytes(Image.new("RGB", (2, 2)), fmt="BMP"))


def test_image_too_many_pixels_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)

    with pytest.raises(inference.InvalidInput, match="4x4 image, more than the 10 pixels"):
        inference.image_to_tensor(image_bytes(Image.new("L", (4, 4))))


# JSON input


def test_json_input_becomes_float32():
    tensor = inference.tensor_from_json([[1, 2], [3, 4]])

    assert tensor.dtype == torch.float32
    assert tensor.tolist() == [[1.0, 2.0], [3.0, 4.0]]


# Cache


def test_cache_evicts_least_recently_used():
    cache = inference.LRUCache(2)
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            return name

        return load

    cache.get(("module", "a"), 1, loader("a"))
    cache.get(("module", "b"), 1, loader("b"))
    cache.get(("module", "a"), 1, loader("a"))
    cache.get(("module", "c"), 1, loader("c"))
    cache.get(("module", "a"), 1, loader("a"))
    cache.get(("module", "b"), 1, loader("b"))

    assert loads == ["a", "b", "c", "b"]
    assert len(cache) == 2


def test_cache_reloads_new_version():
    cache = inference.LRUCache(4)

    first = cache.get(("module", "a"), "v1", lambda: "old")
    second = cache.get(("module", "a"), "v2", lambda: "new")
    third = cache.get(("module", "a"), "v2", lambda: "unused")

    assert (first, second, third) == ("old", "new", "new")
    assert len(cache) == 1


def test_cache_failed_load_stores_nothing():
    cache = inference.LRUCache(4)

    def fail():
        raise inference.ModelNotReady("broken")

    with pytest.raises(inference.ModelNotReady):
        cache.get(("module", "a"), 1, fail)

    assert len(cache) == 0


def test_pool_lends_distinct_copies_up_to_limit():
    loads = []

    def load():
        loads.append(1)
        return torch.nn.Identity()

    pool = inference.ModulePool(load, torch.nn.Identity(), max_replicas=2)
    second_lease_taken = threading.Event()
    release_second = threading.Event()
    third: list[torch.nn.Module] = []

    with pool.lease() as first:

        def hold_second():
            with pool.lease() as second:
                assert second is not first
                second_lease_taken.set()
                release_second.wait(timeout=10)

        holder = threading.Thread(target=hold_second)
        holder.start()
        assert second_lease_taken.wait(timeout=10)

        def take_third():
            with pool.lease() as module:
                third.append(module)

        waiter = threading.Thread(target=take_third)
        waiter.start()
        waiter.join(timeout=0.2)
        assert waiter.is_alive(), "a third lease must wait while two copies are in use"

        release_second.set()
        holder.join(timeout=10)
        waiter.join(timeout=10)

    assert len(third) == 1
    assert pool.replicas == 2
    assert len(loads) == 1


def test_pool_failed_load_frees_slot():
    attempts = []

    def load():
        attempts.append(1)
        raise inference.ModelNotReady("store unavailable")

    pool = inference.ModulePool(load, torch.nn.Identity(), max_replicas=2)

    with pool.lease():
        with pytest.raises(inference.ModelNotReady), pool.lease():
            pass
        with pytest.raises(inference.ModelNotReady), pool.lease():
            pass

    assert len(attempts) == 2
    assert pool.replicas == 1


def test_runtime_reads_environment(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setattr(inference, "_runtime", None)
    monkeypatch.setenv("FEDSERVE_TORCH_THREADS", "1")
    monkeypatch.setenv("FEDSERVE_INFERENCE_REPLICAS", "3")
    try:
        settings = inference.runtime()

        assert settings == inference.Runtime(torch_threads=1, replicas=3)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
        monkeypatch.setattr(inference, "_runtime", None)


# Plans and shapes


@pytest.mark.django_db
def test_plan_without_training_is_none(model_store):
    model = Model.objects.create(owner=make_user(), kind=ModelKind.GLOBAL)

    plan = inference.plan_for(model)

    assert plan == inference.Plan(UncertaintyMethod.NONE, UncertaintyOptions())


@pytest.mark.django_db
def test_plan_mean_model_is_ensemble(model_store):
    model = Model.objects.create(owner=make_user(), kind=ModelKind.MEAN)

    assert inference.plan_for(model).method == UncertaintyMethod.ENSEMBLE


@pytest.mark.django_db
def test_plan_uses_training_method_and_options(model_store):
    owner = make_user()
    training = make_training(
        owner,
        [],
        uncertainty_method="MC_DROPOUT",
        options={"uncertainty": {"N": 3, "softmax": True}},
    )

    plan = inference.plan_for(training.model)

    assert plan == inference.Plan(
        UncertaintyMethod.MC_DROPOUT, UncertaintyOptions(N=3, softmax=True)
    )


@pytest.mark.django_db
def test_plan_invalid_stored_options_409(model_store):
    training = make_training(make_user(), [], options={"uncertainty": {"N": 0}})

    with pytest.raises(inference.ModelNotReady, match="options of training"):
        inference.plan_for(training.model)


@pytest.mark.parametrize(
    ("expected", "shape", "matches"),
    [
        (None, (3, 7), True),
        ([None, 4], (9, 4), True),
        ([2, 4], (2, 4), True),
        ([None, 4], (9, 5), False),
        ([None, 4], (9, 4, 1), False),
        ([1, 3, None, None], (1, 3, 8, 8), True),
    ],
)
def test_check_input_shape_cases(expected, shape, matches):
    model = Model(input_shape=expected)

    if matches:
        inference.check_input_shape(model, torch.zeros(shape), preprocessed=False)
    else:
        with pytest.raises(inference.InvalidInput):
            inference.check_input_shape(model, torch.zeros(shape), preprocessed=False)


# Locking


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.django_db
def test_concurrent_swag_does_not_leak_weights(model_store):
    # SWAG requests write sampled weights into their module copy. A plain pass in another
    # thread must still see the stored weight 2.
    inference.cache.clear()
    owner = make_user()
    model = Model.objects.create(owner=owner, kind=ModelKind.SWAG)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Scale()), buffer)
    model.weights_path = modelstore.save(
        modelstore.model_file_path(model.pk, "weights.pt"), ContentFile(buffer.getvalue())
    )
    model.weights_format = "torchscript"
    for name, value in (("first", torch.tensor([50.0])), ("second", torch.tensor([2600.0]))):
        moment = io.BytesIO()
        torch.save(value, moment)
        path = modelstore.model_file_path(model.pk, f"{name}.pt")
        setattr(
            model, f"swag_{name}_moment_path", modelstore.save(path, ContentFile(moment.getvalue()))
        )
    model.save()
    model_input = torch.ones(1, 1)
    plain = inference.Plan(UncertaintyMethod.NONE, UncertaintyOptions())
    sampled = inference.Plan(UncertaintyMethod.SWAG, UncertaintyOptions(N=50))
    plain_outputs: list[float] = []
    errors: list[BaseException] = []

    def run(plan, rounds):
        try:
            for _ in range(rounds):
                samples = inference._sample(model, plan, model_input)
                if plan is plain:
                    plain_outputs.append(samples.item())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(sampled, 20)) for _ in range(2)]
    threads += [threading.Thread(target=run, args=(plain, 200)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert set(plain_outputs) == {2.0}
    inference.cache.clear()
