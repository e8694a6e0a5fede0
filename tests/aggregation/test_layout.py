import pytest
import torch

from fedserve.aggregation import AggregationError, FlatLayout
from tests.aggregation.states import make_global_state, make_update


def test_layout_records_entries_in_key_order():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)

    assert [entry.key for entry in layout.entries] == list(state)
    for entry in layout.entries:
        assert entry.shape == tuple(state[entry.key].shape)
        assert entry.dtype == state[entry.key].dtype
    assert [entry.key for entry in layout.integer_entries] == ["1.num_batches_tracked"]
    assert layout.numel == sum(t.numel() for t in state.values() if t.dtype.is_floating_point)
    assert layout.dtype == torch.float32


def test_layout_offsets_are_consecutive():
    layout = FlatLayout.from_state_dict(make_global_state())

    offset = 0
    for entry in layout.float_entries:
        assert entry.offset == offset
        offset += entry.numel
    assert offset == layout.numel


def test_flatten_concatenates_floating_entries():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)

    flat = layout.flatten(state)

    expected = torch.cat([t.reshape(-1) for t in state.values() if t.dtype.is_floating_point])
    assert flat.dtype == torch.float32
    assert flat.is_contiguous()
    assert torch.equal(flat, expected)


def test_flatten_unflatten_round_trip_keeps_dtypes():
    state = make_global_state(half_head=True)
    state["extra.bf16"] = torch.randn(5).to(torch.bfloat16)
    state["extra.mask"] = torch.tensor([True, False])
    layout = FlatLayout.from_state_dict(state)

    flat = layout.flatten(state)
    restored = layout.unflatten(flat, layout.integer_tensors(state))

    assert list(restored) == list(state)
    for key, value in state.items():
        assert restored[key].dtype == value.dtype, key
        assert restored[key].shape == value.shape, key
        assert torch.equal(restored[key], value), key


def test_flatten_of_float64_entry_makes_float64_vector():
    state = {"weight": torch.randn(3, dtype=torch.float64), "bias": torch.randn(2)}
    layout = FlatLayout.from_state_dict(state)

    flat = layout.flatten(state)

    assert flat.dtype == torch.float64
    assert torch.equal(flat[3:], state["bias"].double())


def test_flatten_accepts_non_contiguous_tensor():
    state = {"weight": torch.randn(4, 3)}
    layout = FlatLayout.from_state_dict(state)
    transposed_copy = {"weight": state["weight"].t().contiguous().t()}

    assert not transposed_copy["weight"].is_contiguous()
    assert torch.equal(layout.flatten(transposed_copy), state["weight"].reshape(-1))


def test_unflatten_returns_views_for_matching_dtype():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)
    flat = layout.flatten(state)

    restored = layout.unflatten(flat, layout.integer_tensors(state))
    flat.zero_()

    assert torch.count_nonzero(restored["0.weight"]) == 0


def test_unflatten_rejects_wrong_length():
    layout = FlatLayout.from_state_dict(make_global_state())

    with pytest.raises(AggregationError, match="1-D floating-point tensor"):
        layout.unflatten(torch.zeros(layout.numel + 1), {})


def test_unflatten_rejects_missing_integer_entry():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)

    with pytest.raises(AggregationError, match="num_batches_tracked"):
        layout.unflatten(layout.flatten(state), {})


def test_unflatten_rejects_integer_entry_of_wrong_dtype():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)

    with pytest.raises(AggregationError, match=r"dtype torch\.int32") as caught:
        layout.unflatten(
            layout.flatten(state), {"1.num_batches_tracked": torch.tensor(1, dtype=torch.int32)}
        )
    assert caught.value.key == "1.num_batches_tracked"


def test_check_accepts_keys_in_other_order():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)

    layout.check(dict(reversed(list(make_update(state, 1).items()))), update_index=1)


def test_check_rejects_missing_key():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)
    update = make_update(state, 1)
    del update["1.running_var"]

    message = r"Update 2 is missing key '1\.running_var'"
    with pytest.raises(AggregationError, match=message) as caught:
        layout.check(update, update_index=2)
    assert caught.value.key == "1.running_var"
    assert caught.value.update_index == 2


def test_check_rejects_extra_key():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)
    update = make_update(state, 1)
    update["head.extra"] = torch.zeros(1)

    with pytest.raises(AggregationError, match=r"key 'head\.extra', which the global") as caught:
        layout.check(update, update_index=1)
    assert caught.value.key == "head.extra"


def test_check_rejects_wrong_shape():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)
    update = make_update(state, 1)
    update["4.weight"] = torch.zeros(3, 9)

    with pytest.raises(AggregationError, match=r"shape \(3, 9\) for key '4\.weight'") as caught:
        layout.check(update, update_index=1)
    assert caught.value.key == "4.weight"


def test_check_rejects_wrong_dtype():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)
    update = make_update(state, 1)
    update["0.bias"] = update["0.bias"].double()

    with pytest.raises(AggregationError, match=r"dtype torch\.float64 for key '0\.bias'") as caught:
        layout.check(update, update_index=1)
    assert caught.value.key == "0.bias"


def test_check_rejects_non_tensor_value():
    state = make_global_state()
    layout = FlatLayout.from_state_dict(state)
    update = make_update(state, 1)
    update["0.bias"] = [0.0] * 8  # type: ignore[assignment]

    with pytest.raises(AggregationError, match=r"a list for key '0\.bias', not a tensor"):
        layout.check(update, update_index=1)


def test_layout_rejects_complex_entry():
    with pytest.raises(AggregationError, match=r"torch\.complex64 for key 'rotation'"):
        FlatLayout.from_state_dict({"rotation": torch.zeros(2, dtype=torch.complex64)})


def test_layout_rejects_non_tensor_entry():
    with pytest.raises(AggregationError, match=r"a str for key 'name'"):
        FlatLayout.from_state_dict({"name": "resnet"})  # type: ignore[dict-item]


def test_layout_of_empty_state_dict():
    layout = FlatLayout.from_state_dict({})

    assert layout.numel == 0
    assert layout.unflatten(torch.zeros(0), {}) == {}
