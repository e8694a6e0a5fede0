import pytest
import torch

from fedserve.uncertainty import mc_dropout, summarize
from tests.uncertainty.helpers import (
    DropoutNet,
    NormNet,
    linear,
    scripted,
    with_running_statistics,
)

N = 20


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_mc_dropout_without_dropout_has_zero_variance():
    module = linear([[1.0, 2.0, 3.0, 4.0]], [0.5])

    result = summarize(mc_dropout.sample(module, torch.randn(8, 4), N))

    assert torch.count_nonzero(result["variance"]) == 0


def test_mc_dropout_with_dropout_has_positive_variance():
    module = DropoutNet()

    samples = mc_dropout.sample(module, torch.randn(8, 4), N)
    result = summarize(samples)

    assert samples.shape == (N, 8, 3)
    assert bool((result["variance"] > 0).all())


def test_mc_dropout_torchscript_with_dropout_has_positive_variance():
    module = scripted(DropoutNet())

    result = summarize(mc_dropout.sample(module, torch.randn(8, 4), N))

    assert bool((result["variance"] > 0).all())


def test_mc_dropout_torchscript_without_dropout_has_zero_variance():
    module = scripted(with_running_statistics(NormNet()))

    result = summarize(mc_dropout.sample(module, torch.randn(8, 4), N))

    assert torch.count_nonzero(result["variance"]) == 0


@pytest.mark.parametrize("make", [lambda m: m, scripted], ids=["python", "torchscript"])
def test_mc_dropout_keeps_batchnorm_in_eval_mode(make):
    # Running statistics (mean 3, variance 4) are far from any batch's, so an output
    # normalised with batch statistics would differ from the eval-mode output.
    module = make(with_running_statistics(NormNet()))
    model_input = torch.randn(8, 4)
    module.eval()
    with torch.no_grad():
        expected = module(model_input)

    samples = mc_dropout.sample(module, model_input, N)

    for output in samples:
        assert torch.equal(output, expected)
    assert module.norm.running_mean.tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("make", [lambda m: m, scripted], ids=["python", "torchscript"])
def test_mc_dropout_activates_only_dropout_layers(make):
    module = make(with_running_statistics(DropoutNet(dropout=0.0)))
    module.train()
    model_input = torch.randn(8, 4)

    layers = mc_dropout.dropout_layers(module)
    samples = mc_dropout.sample(module, model_input, 3)

    assert layers == [module.dropout]
    # Dropout with p=0 changes nothing, so every pass equals the eval-mode output.
    module.eval()
    with torch.no_grad():
        expected = module(model_input)
    assert torch.equal(samples[0], expected)
    assert module.norm.running_mean.tolist() == [3.0] * 16


def test_mc_dropout_leaves_module_in_eval_mode():
    module = scripted(DropoutNet())

    mc_dropout.sample(module, torch.randn(2, 4), 2)

    assert not any(submodule.training for submodule in module.modules())


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Dropout1d(0.5),
        torch.nn.Dropout2d(0.5),
        torch.nn.Dropout3d(0.5),
        torch.nn.AlphaDropout(0.5),
        torch.nn.FeatureAlphaDropout(0.5),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_dropout_layers_finds_every_scripted_dropout_kind(layer):
    module = scripted(torch.nn.Sequential(torch.nn.Identity(), layer))

    assert [found.original_name for found in mc_dropout.dropout_layers(module)] == [
        type(layer).__name__
    ]


def test_mc_dropout_rejects_zero_passes():
    with pytest.raises(ValueError):
        mc_dropout.sample(DropoutNet(), torch.randn(2, 4), 0)
