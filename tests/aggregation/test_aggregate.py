import math

import pytest
import torch

from fedserve.aggregation import AggregationError, aggregate
from tests.aggregation.states import (
    make_global_state,
    make_update,
    reference_average,
    relative_error,
)

WEIGHTS = [120.0, 7.0, 3000.0, 55.0, 1.0]


def make_updates(
    global_state: dict[str, torch.Tensor], weights: list[float] = WEIGHTS
) -> list[tuple[dict[str, torch.Tensor], float]]:
    return [
        (make_update(global_state, seed, batches=10 * seed), weight)
        for seed, weight in enumerate(weights, start=1)
    ]


def test_fedavg_matches_float64_weighted_average():
    global_state = make_global_state()
    updates = make_updates(global_state)

    result = aggregate("FedAvg", global_state, iter(updates))

    reference = reference_average(updates)
    assert list(result) == list(global_state)
    for key, expected in reference.items():
        assert result[key].dtype == torch.float32, key
        assert relative_error(result[key], expected) < 1e-6, key


def test_fedavg_averages_batchnorm_running_statistics():
    global_state = make_global_state()
    updates = make_updates(global_state)

    result = aggregate("FedAvg", global_state, iter(updates))

    total = sum(WEIGHTS)
    for key in ("1.running_mean", "1.running_var"):
        expected = sum(state[key].double() * weight for state, weight in updates) / total
        assert torch.allclose(result[key].double(), expected, rtol=1e-6, atol=0), key


def test_integer_buffer_takes_maximum_and_keeps_dtype():
    global_state = make_global_state()
    updates = make_updates(global_state)

    result = aggregate("FedAvg", global_state, iter(updates))

    assert result["1.num_batches_tracked"].dtype == torch.int64
    assert result["1.num_batches_tracked"].shape == ()
    assert result["1.num_batches_tracked"].item() == 10 * len(WEIGHTS)


def test_integer_buffer_ignores_zero_weight_update():
    global_state = make_global_state()
    updates = [
        (make_update(global_state, 1, batches=4), 2.0),
        (make_update(global_state, 2, batches=900), 0.0),
        (make_update(global_state, 3, batches=6), 1.0),
    ]

    result = aggregate("FedAvg", global_state, iter(updates))

    assert result["1.num_batches_tracked"].item() == 6


def test_zero_weight_update_does_not_change_average():
    global_state = make_global_state()
    counted = make_updates(global_state, [2.0, 5.0])
    ignored = (make_update(global_state, 99), 0.0)

    with_ignored = aggregate("FedAvg", global_state, iter([counted[0], ignored, counted[1]]))
    without = aggregate("FedAvg", global_state, iter(counted))

    for key in without:
        assert torch.equal(with_ignored[key], without[key]), key


def test_bool_buffer_takes_logical_or():
    global_state = {"weight": torch.zeros(2), "mask": torch.tensor([False, False, True])}
    updates = [
        ({"weight": torch.ones(2), "mask": torch.tensor([True, False, False])}, 1.0),
        ({"weight": torch.ones(2), "mask": torch.tensor([False, False, True])}, 1.0),
    ]

    result = aggregate("FedAvg", global_state, iter(updates))

    assert result["mask"].dtype == torch.bool
    assert result["mask"].tolist() == [True, False, True]


def test_half_precision_entries_are_cast_back():
    global_state = make_global_state(half_head=True)
    updates = make_updates(global_state)

    result = aggregate("FedAvg", global_state, iter(updates))

    reference = reference_average(updates)
    for key in ("4.weight", "4.bias"):
        assert result[key].dtype == torch.float16, key
        expected_half = reference[key].to(torch.float16)
        # Summing in float32 leaves at most one float16 rounding step per element.
        assert torch.allclose(result[key].float(), expected_half.float(), rtol=2**-10, atol=0)
    assert relative_error(result["0.weight"], reference["0.weight"]) < 1e-6


def test_half_precision_sum_does_not_overflow():
    global_state = {"weight": torch.zeros(4, dtype=torch.float16)}
    updates = [({"weight": torch.full((4,), 60000.0, dtype=torch.float16)}, 50000.0)] * 3

    result = aggregate("FedAvg", global_state, iter(updates))

    assert result["weight"].tolist() == [60000.0] * 4


def test_float64_model_is_averaged_in_float64():
    global_state = {"weight": torch.zeros(1000, dtype=torch.float64), "bias": torch.zeros(3)}
    generator = torch.Generator().manual_seed(1)
    updates = [
        (
            {
                "weight": torch.randn(1000, dtype=torch.float64, generator=generator),
                "bias": torch.randn(3, generator=generator),
            },
            float(weight),
        )
        for weight in (3, 9, 27)
    ]

    result = aggregate("FedAvg", global_state, iter(updates))

    reference = reference_average(updates)
    assert result["weight"].dtype == torch.float64
    assert relative_error(result["weight"], reference["weight"]) < 1e-14
    assert result["bias"].dtype == torch.float32


def test_fedprox_equals_fedavg():
    global_state = make_global_state()
    updates = make_updates(global_state)

    fedprox = aggregate("FedProx", global_state, iter(updates))
    fedavg = aggregate("FedAvg", global_state, iter(updates))

    for key in fedavg:
        assert torch.equal(fedprox[key], fedavg[key]), key


def test_feddc_is_weighted_average():
    global_state = make_global_state()
    updates = make_updates(global_state)

    result = aggregate("FedDC", global_state, iter(updates))

    for key, expected in reference_average(updates).items():
        assert relative_error(result[key], expected) < 1e-6, key


def test_equal_weights_give_plain_mean():
    global_state = {"weight": torch.zeros(3)}
    updates = [({"weight": torch.tensor([1.0, 2.0, 3.0]) * k}, 5.0) for k in (1, 2, 3)]

    result = aggregate("FedDC", global_state, iter(updates))

    assert result["weight"].tolist() == [2.0, 4.0, 6.0]


def test_aggregate_reads_iterator_once_and_lazily():
    global_state = make_global_state()
    produced: list[int] = []

    def lazy_updates():
        for seed in range(1, 4):
            produced.append(seed)
            yield make_update(global_state, seed), float(seed)

    aggregate("FedAvg", global_state, lazy_updates())

    assert produced == [1, 2, 3]


def test_aggregate_leaves_inputs_unchanged():
    global_state = make_global_state()
    updates = make_updates(global_state)
    global_copy = {key: value.clone() for key, value in global_state.items()}
    update_copies = [{key: value.clone() for key, value in state.items()} for state, _ in updates]

    result = aggregate("FedAvg", global_state, iter(updates))
    for value in result.values():
        value.add_(1)

    for key, value in global_copy.items():
        assert torch.equal(global_state[key], value), key
    for (state, _), copy in zip(updates, update_copies, strict=True):
        for key, value in copy.items():
            assert torch.equal(state[key], value), key


def test_aggregate_result_shares_no_memory_with_inputs():
    global_state = make_global_state()
    updates = make_updates(global_state, [1.0])

    result = aggregate("FedAvg", global_state, iter(updates))

    input_pointers = {
        tensor.untyped_storage().data_ptr()
        for state in [global_state, updates[0][0]]
        for tensor in state.values()
    }
    for key, value in result.items():
        assert value.untyped_storage().data_ptr() not in input_pointers, key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda u: u.pop("1.running_var"), r"Update 2 is missing key '1\.running_var'"),
        (lambda u: u.update(extra=torch.zeros(1)), r"Update 2 has key 'extra', which"),
        (lambda u: u.update({"0.bias": torch.zeros(9)}), r"shape \(9,\) for key '0\.bias'"),
        (
            lambda u: u.update({"0.bias": torch.zeros(8, dtype=torch.float16)}),
            r"dtype torch\.float16 for key '0\.bias'",
        ),
        (
            lambda u: u.update({"1.num_batches_tracked": torch.tensor(1.0)}),
            r"dtype torch\.float32 for key '1\.num_batches_tracked'",
        ),
    ],
    ids=["missing key", "extra key", "wrong shape", "wrong dtype", "float integer buffer"],
)
def test_layout_mismatch_names_update_and_key(change, message):
    global_state = make_global_state()
    good = make_update(global_state, 1)
    bad = make_update(global_state, 2)
    change(bad)

    with pytest.raises(AggregationError, match=message) as caught:
        aggregate("FedAvg", global_state, iter([(good, 1.0), (bad, 1.0)]))
    assert caught.value.update_index == 2


def test_zero_total_weight_is_rejected():
    global_state = make_global_state()
    updates = make_updates(global_state, [0.0, 0.0])

    with pytest.raises(AggregationError, match="total weight of the 2 updates is 0"):
        aggregate("FedAvg", global_state, iter(updates))


def test_no_updates_is_rejected():
    with pytest.raises(AggregationError, match="No updates were given"):
        aggregate("FedAvg", make_global_state(), iter([]))


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf, "ten", True])
def test_invalid_weight_is_rejected(weight):
    global_state = make_global_state()
    updates = [(make_update(global_state, 1), 1.0), (make_update(global_state, 2), weight)]

    with pytest.raises(AggregationError, match="Update 2 has weight") as caught:
        aggregate("FedAvg", global_state, iter(updates))
    assert caught.value.update_index == 2


def test_integer_weight_is_accepted():
    global_state = {"weight": torch.zeros(2)}
    updates = [({"weight": torch.ones(2)}, 3), ({"weight": torch.zeros(2)}, 1)]

    result = aggregate("FedAvg", global_state, iter(updates))

    assert result["weight"].tolist() == [0.75, 0.75]


def test_unknown_method_lists_known_methods():
    with pytest.raises(AggregationError, match=r"'FedMedian'\. Use one of: FedAvg, FedProx, FedDC"):
        aggregate("FedMedian", make_global_state(), iter([]))


def test_unknown_option_is_rejected():
    global_state = make_global_state()

    with pytest.raises(AggregationError, match="Unknown option 'mu' for aggregation method"):
        aggregate("FedProx", global_state, iter(make_updates(global_state)), options={"mu": 0.1})


def test_empty_options_are_accepted():
    global_state = make_global_state()

    result = aggregate("FedAvg", global_state, iter(make_updates(global_state)), options={})

    assert list(result) == list(global_state)
