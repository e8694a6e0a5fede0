"""SWAG moments: the average of the participants' first and second moments.

Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning",
NeurIPS 2019, https://arxiv.org/abs/1902.02476

Each participant sends the mean of its flattened parameters over its SGD iterates and
the mean of their squares. The server averages both with the sample sizes as weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedserve.aggregation.errors import AggregationError
from fedserve.aggregation.weighted import WeightedSum, accumulation_dtype


def average_swag_moments(
    moments: Iterable[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first and second moments averaged with the sample sizes as weights.

    Every pair must have the shape and dtype of the first pair, and the results have
    them too. Moments are summed in float32 (float64 for float64 moments). Each pair is
    dropped before the next one is requested, so a lazy iterator keeps one in memory.
    """
    first_sum: WeightedSum | None = None
    second_sum: WeightedSum | None = None
    shape: tuple[int, ...] = ()
    dtype = torch.float32
    # Not enumerate(), which would keep the previous pair alive while loading the next.
    index = 0
    for first, second, weight in moments:
        index += 1  # noqa: SIM113
        if first_sum is None or second_sum is None:
            shape, dtype = tuple(first.shape), first.dtype
            _check_moment("first", first, index, shape, dtype)
            numel, sum_dtype = first.numel(), accumulation_dtype(first)
            first_sum = WeightedSum(numel, dtype=sum_dtype, device=first.device)
            second_sum = WeightedSum(numel, dtype=sum_dtype, device=first.device)
        _check_moment("first", first, index, shape, dtype)
        _check_moment("second", second, index, shape, dtype)

        first_sum.add(first, weight)
        second_sum.add(second, weight)
        del first, second

    if first_sum is None or second_sum is None:
        raise AggregationError("No SWAG moments were given, so there is nothing to average.")
    return (
        first_sum.average().view(shape).to(dtype),
        second_sum.average().view(shape).to(dtype),
    )


def _check_moment(
    name: str, moment: object, index: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    if not isinstance(moment, torch.Tensor) or not moment.dtype.is_floating_point:
        raise AggregationError(
            f"SWAG update {index} has a {name} moment of type {type(moment).__name__} "
            f"(dtype {getattr(moment, 'dtype', None)}). Send a floating-point tensor.",
            update_index=index,
        )
    if tuple(moment.shape) != shape or moment.dtype != dtype:
        raise AggregationError(
            f"SWAG update {index} has a {name} moment of shape {tuple(moment.shape)} and "
            f"dtype {moment.dtype}, but update 1 has shape {shape} and dtype {dtype}. Every "
            "participant must send moments of the same flattened model.",
            update_index=index,
        )
