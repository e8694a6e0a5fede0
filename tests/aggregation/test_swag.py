import pytest
import torch

from fedserve.aggregation import AggregationError, average_swag_moments
from tests.aggregation.states import relative_error


def make_moments(count: int, numel: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    generator = torch.Generator().manual_seed(3)
    moments = []
    for index in range(count):
        first = torch.randn(numel, generator=generator)
        second = first**2 + torch.rand(numel, generator=generator)
        moments.append((first, second, float(10 * (index + 1))))
    return moments


def test_swag_moments_are_weighted_by_sample_size():
    moments = make_moments(4, 1000)

    first, second = average_swag_moments(iter(moments))

    total = sum(weight for _, _, weight in moments)
    expected_first = sum(m.double() * w for m, _, w in moments) / total
    expected_second = sum(s.double() * w for _, s, w in moments) / total
    assert first.dtype == torch.float32
    assert first.shape == (1000,)
    assert relative_error(first, expected_first) < 1e-6
    assert relative_error(second, expected_second) < 1e-6


def test_swag_half_moments_keep_dtype():
    moments = [(m.half(), s.half(), w) for m, s, w in make_moments(2, 10)]

    first, second = average_swag_moments(iter(moments))

    assert first.dtype == torch.float16
    assert second.dtype == torch.float16


def test_swag_rejects_shape_mismatch():
    moments = make_moments(2, 10)
    moments.append((torch.zeros(11), torch.zeros(11), 1.0))

    with pytest.raises(AggregationError, match=r"update 3 has a first moment of shape \(11,\)"):
        average_swag_moments(iter(moments))


def test_swag_rejects_second_moment_of_other_shape():
    with pytest.raises(AggregationError, match="second moment of shape"):
        average_swag_moments(iter([(torch.zeros(4), torch.zeros(5), 1.0)]))


def test_swag_rejects_integer_moment():
    with pytest.raises(AggregationError, match="Send a floating-point tensor"):
        average_swag_moments(iter([(torch.zeros(4, dtype=torch.int64), torch.zeros(4), 1.0)]))


def test_swag_rejects_empty_input():
    with pytest.raises(AggregationError, match="No SWAG moments were given"):
        average_swag_moments(iter([]))


def test_swag_rejects_zero_total_weight():
    moments = [(m, s, 0.0) for m, s, _ in make_moments(2, 10)]

    with pytest.raises(AggregationError, match="total weight"):
        average_swag_moments(iter(moments))
