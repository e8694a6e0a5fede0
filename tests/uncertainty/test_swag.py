import pytest
import torch

from fedserve.uncertainty import SwagMomentsError, summarize, swag
from tests.uncertainty.helpers import NormNet, scripted, with_running_statistics

SAMPLES = 2000


def _echo_weights(size: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    """Return a bias-free Linear(size, 1) and the identity input, so output i is weight i."""
    return torch.nn.Linear(size, 1, bias=False), torch.eye(size)


def _posterior(mean: list[float], variance: list[float]) -> swag.SwagPosterior:
    first = torch.tensor(mean, dtype=torch.float64)
    second = torch.tensor(variance, dtype=torch.float64) + first**2
    return swag.posterior_from_moments(first, second)


def test_swag_sample_mean_and_std_match_moments():
    # Variances 4 and 0.25 have standard deviations 2 and 0.5: a sampler that used the
    # variance as the standard deviation would spread the weights by 4 and 0.25.
    mean = [1.0, -2.0, 0.5]
    variance = [4.0, 0.25, 1.0]
    module, model_input = _echo_weights(3)
    module.double()

    samples = swag.sample(
        module,
        model_input.double(),
        _posterior(mean, variance),
        SAMPLES,
        generator=torch.Generator().manual_seed(0),
    )
    weights = samples.reshape(SAMPLES, 3)

    expected_std = torch.tensor(variance, dtype=torch.float64).sqrt()
    # The sample mean has standard error std / sqrt(2000); allow five standard errors.
    mean_tolerance = 5 * expected_std / SAMPLES**0.5
    assert bool(((weights.mean(dim=0) - torch.tensor(mean)).abs() < mean_tolerance).all())
    # The sample standard deviation has relative standard error about 1 / sqrt(2 * 2000),
    # 1.6 %; allow 8 %.
    relative_std_error = (weights.std(dim=0) / expected_std - 1).abs()
    assert bool((relative_std_error < 0.08).all())


def test_swag_draws_distinct_samples():
    module, model_input = _echo_weights(3)

    samples = swag.sample(
        module,
        model_input,
        _posterior([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
        SAMPLES,
        generator=torch.Generator().manual_seed(1),
    )

    distinct = torch.unique(samples.reshape(SAMPLES, 3), dim=0)
    assert distinct.shape[0] == SAMPLES
    assert bool((summarize(samples)["std"] > 0.9).all())


def test_swag_prediction_is_mean_over_samples():
    module, model_input = _echo_weights(2)
    posterior = _posterior([3.0, -1.0], [1.0, 1.0])

    samples = swag.sample(module, model_input, posterior, 10)

    assert torch.allclose(summarize(samples)["inference"], samples.mean(dim=0))


def test_swag_negative_variance_is_floored():
    # Second moment below the first moment squared: variance is clamped to 1e-30, not NaN.
    posterior = swag.posterior_from_moments(torch.tensor([2.0, 1.0]), torch.tensor([3.0, 1.0]))

    assert posterior.std.tolist() == pytest.approx([1e-15, 1e-15])


def test_swag_writes_parameters_in_parameters_order():
    # fc.weight (3x4 = 12 values), fc.bias (3), norm.weight (3), norm.bias (3); the
    # BatchNorm buffers are not part of the moments. With zero variance every sample
    # has exactly these weights.
    module = with_running_statistics(NormNet())
    flat = torch.arange(21, dtype=torch.float32) / 10
    posterior = swag.posterior_from_moments(flat, flat**2)
    model_input = torch.randn(5, 4)

    samples = swag.sample(module, model_input, posterior, 2)

    expected_module = with_running_statistics(NormNet())
    torch.nn.utils.vector_to_parameters(flat, expected_module.parameters())
    expected_module.eval()
    with torch.no_grad():
        expected = expected_module(model_input)
    assert torch.allclose(samples[0], expected)
    assert torch.allclose(samples[1], expected)


def test_swag_restores_stored_weights():
    module = scripted(NormNet())
    before = {name: value.clone() for name, value in module.state_dict().items()}
    posterior = _posterior([0.0] * 21, [1.0] * 21)

    swag.sample(module, torch.randn(2, 4), posterior, 3)

    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_swag_torchscript_module_samples_vary():
    module = scripted(NormNet())
    posterior = _posterior([0.0] * 21, [1.0] * 21)

    samples = swag.sample(module, torch.randn(2, 4), posterior, 5)

    assert bool((summarize(samples)["variance"] > 0).all())


def test_swag_rejects_moments_of_wrong_size():
    module = NormNet()
    posterior = _posterior([0.0] * 20, [1.0] * 20)

    with pytest.raises(SwagMomentsError, match="20 values but the model has 21"):
        swag.sample(module, torch.randn(2, 4), posterior, 3)


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (torch.zeros(3), torch.ones(4), "3 values but the second moment has 4"),
        (torch.zeros(3, dtype=torch.int64), torch.ones(3), "dtype torch.int64"),
        (torch.tensor([0.0, float("nan")]), torch.ones(2), "NaN or infinity"),
    ],
)
def test_posterior_from_moments_rejects_bad_moments(first, second, message):
    with pytest.raises(SwagMomentsError, match=message):
        swag.posterior_from_moments(first, second)
