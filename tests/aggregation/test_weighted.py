import gc

import pytest
import torch

from fedserve.aggregation import AggregationError, WeightedSum, weighted_average
from fedserve.aggregation.fedavg import fedavg
from fedserve.aggregation.feddc import feddc
from fedserve.aggregation.fedprox import fedprox
from fedserve.aggregation.weighted import empty_flat
from tests.aggregation.states import relative_error


def random_updates(count: int, numel: int, seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(numel, generator=generator),
            float(torch.randint(1, 5000, (), generator=generator)),
        )
        for _ in range(count)
    ]


def float64_average(updates: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    total = sum(weight for _, weight in updates)
    return sum(flat.double() * weight for flat, weight in updates) / total


@pytest.mark.parametrize("strategy", [fedavg, fedprox, feddc])
def test_strategy_on_flat_tensors_matches_float64(strategy):
    updates = random_updates(50, 10_000)

    result = strategy(torch.zeros(10_000), iter(updates))

    assert result.shape == (10_000,)
    assert result.dtype == torch.float32
    assert relative_error(result, float64_average(updates)) < 1e-6


def test_parts_and_flat_tensor_give_same_result():
    updates = random_updates(5, 60)
    as_parts = [([flat[:12].view(3, 4), flat[12:]], weight) for flat, weight in updates]

    from_parts = weighted_average([torch.zeros(3, 4), torch.zeros(48)], iter(as_parts))
    from_flat = weighted_average(torch.zeros(60), iter(updates))

    assert torch.equal(from_parts, from_flat)


def test_global_values_do_not_enter_average():
    updates = random_updates(3, 10)

    from_zeros = fedavg(torch.zeros(10), iter(updates))
    from_ones = fedavg(torch.ones(10), iter(updates))

    assert torch.equal(from_zeros, from_ones)


def test_mixed_dtype_parts_are_added_in_steps(monkeypatch):
    monkeypatch.setattr("fedserve.aggregation.weighted._CAST_CHUNK", 7)
    halves = [(torch.randn(50).half(), 2.0), (torch.randn(50).half(), 3.0)]

    result = weighted_average(torch.zeros(50), iter(halves))

    expected = (halves[0][0].double() * 2 + halves[1][0].double() * 3) / 5
    assert relative_error(result, expected) < 1e-6


def test_float64_global_gives_float64_result():
    updates = [(torch.randn(10, dtype=torch.float64), 1.0), (torch.randn(10).double(), 2.0)]

    result = fedavg(torch.zeros(10, dtype=torch.float64), iter(updates))

    assert result.dtype == torch.float64


def test_wrong_length_is_rejected():
    updates = [(torch.zeros(10), 1.0), (torch.zeros(11), 1.0)]

    with pytest.raises(AggregationError, match="Update 2 has 11 elements, but the global"):
        fedavg(torch.zeros(10), iter(updates))


def test_integer_part_is_rejected():
    with pytest.raises(AggregationError, match=r"dtype torch\.int64"):
        fedavg(torch.zeros(3), iter([(torch.zeros(3, dtype=torch.int64), 1.0)]))


def test_weighted_sum_counts_zero_weight_updates():
    total = WeightedSum(2, dtype=torch.float32, device=torch.device("cpu"))

    total.add(torch.ones(2), 0.0)
    total.add(torch.full((2,), 4.0), 2.0)

    assert total.count == 2
    assert total.average().tolist() == [4.0, 4.0]


def test_weighted_sum_rejects_add_after_average():
    total = WeightedSum(1, dtype=torch.float32, device=torch.device("cpu"))
    total.add(torch.ones(1), 1.0)
    total.average()

    with pytest.raises(RuntimeError, match="after average"):
        total.add(torch.ones(1), 1.0)


def test_empty_flat_large_buffer_is_usable():
    numel = 5_000_000  # 20 MB: above the size that gets huge pages
    flat = empty_flat(numel, dtype=torch.float32, device=torch.device("cpu"))

    assert flat.shape == (numel,)
    assert flat.dtype == torch.float32
    assert flat.is_contiguous()
    flat.fill_(2.0)
    assert float(flat.sum()) == 2.0 * numel


def test_empty_flat_view_outlives_buffer():
    flat = empty_flat(5_000_000, dtype=torch.float64, device=torch.device("cpu"))
    view = flat[-3:]
    del flat
    gc.collect()

    view.fill_(1.5)

    assert view.tolist() == [1.5, 1.5, 1.5]


def test_empty_flat_small_buffer():
    flat = empty_flat(10, dtype=torch.float32, device=torch.device("cpu"))

    assert flat.shape == (10,)
