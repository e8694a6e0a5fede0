"""Aggregate state dicts that arrive one at a time, for the round logic.

Integer and bool buffers, such as BatchNorm's `num_batches_tracked`, are not averaged.
Each gets the elementwise maximum over the updates with a weight above 0, and keeps its
dtype. For `num_batches_tracked` that is the count of the participant that trained on
the most batches, and no update can make it overflow or turn fractional.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from fedserve.aggregation.errors import AggregationError
from fedserve.aggregation.layout import FlatLayout
from fedserve.aggregation.registry import get_strategy
from fedserve.aggregation.weighted import check_weight


def aggregate(
    method: str,
    global_state: Mapping[str, torch.Tensor],
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]],
    *,
    options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Aggregate local state dicts into a new global state dict with the strategy `method`.

    `updates` yields (state dict, sample size) pairs and may load each one lazily. Every
    update is checked against the layout of `global_state` (keys, shapes, dtypes), added
    into one flat accumulator and dropped before the next one is requested. Peak memory
    is therefore the accumulator plus one update, about twice the model size for any
    number of updates, provided the iterator keeps no reference to what it yielded.

    Floating entries are averaged with the sample sizes as weights, in float32 (float64
    for float64 models), and float16 and bfloat16 entries are cast back. The result
    shares no memory with the inputs. `options` are the strategy's keyword options, and
    none of the built-in strategies takes any. FedProx's `mu` is for the participants.

    Raises AggregationError, naming the update and key, for a layout mismatch, a
    negative or non-finite weight, a total weight of 0, an unknown method or an
    unknown option.
    """
    strategy = get_strategy(method)
    options = dict(options or {})
    strategy.check_options(options)
    layout = FlatLayout.from_state_dict(global_state)
    integers = _IntegerMaximum(layout)

    flat = strategy.function(
        layout.float_tensors(global_state), _checked_updates(layout, updates, integers), **options
    )
    if flat.shape != (layout.numel,):
        raise RuntimeError(
            f"Internal error: aggregation method {strategy.name} returned shape "
            f"{tuple(flat.shape)} instead of ({layout.numel},)."
        )
    return layout.unflatten(flat, integers.result())


def _checked_updates(
    layout: FlatLayout,
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]],
    integers: _IntegerMaximum,
) -> Iterator[tuple[list[torch.Tensor], float]]:
    # A plain counter instead of enumerate(): enumerate keeps its last item alive while
    # it fetches the next, which would hold two updates in memory at once.
    index = 0
    for state, weight in updates:
        index += 1  # noqa: SIM113
        value = check_weight(weight, update_index=index)
        layout.check(state, update_index=index)
        if value > 0:
            integers.add(state)
        parts = layout.float_tensors(state)
        del state
        yield parts, value
        del parts


class _IntegerMaximum:
    """The running elementwise maximum of the integer and bool entries."""

    def __init__(self, layout: FlatLayout) -> None:
        self._keys = [entry.key for entry in layout.integer_entries]
        self._values: dict[str, torch.Tensor] | None = None

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        if self._values is None:
            self._values = {key: state[key].clone() for key in self._keys}
            return
        for key in self._keys:
            torch.maximum(self._values[key], state[key], out=self._values[key])

    def result(self) -> dict[str, torch.Tensor]:
        if self._values is None:
            if self._keys:
                raise AggregationError("No update has a weight above 0.")
            return {}
        return self._values
