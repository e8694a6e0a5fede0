"""Aggregation strategies by name, the names being `Training.aggregation_method` values."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from fedserve.aggregation.errors import AggregationError
from fedserve.aggregation.fedavg import fedavg
from fedserve.aggregation.feddc import feddc
from fedserve.aggregation.fedprox import fedprox


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A named aggregation strategy and the keyword options its function accepts.

    `function(global_flat, updates, **options)` takes the global model as a flat vector
    and an iterable of (flat update, sample size) pairs, and returns the new global model
    as a new 1-D tensor of the global vector's accumulation dtype. It must drop each
    update before requesting the next, so that a lazy iterator keeps one in memory.
    """

    name: str
    function: Callable[..., torch.Tensor]
    options: frozenset[str] = frozenset()

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise AggregationError for an option that the strategy does not accept."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise AggregationError(
                f"Unknown option {unknown[0]!r} for aggregation method {self.name}. Options "
                f"it accepts: {accepted}."
            )


STRATEGIES: Mapping[str, Strategy] = MappingProxyType(
    {
        strategy.name: strategy
        for strategy in (
            Strategy("FedAvg", fedavg),
            Strategy("FedProx", fedprox),
            Strategy("FedDC", feddc),
        )
    }
)


def get_strategy(name: str) -> Strategy:
    """Return the strategy registered as `name`, raising AggregationError for unknown names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise AggregationError(
            f"Unknown aggregation method {name!r}. Use one of: {', '.join(STRATEGIES)}."
        ) from None
