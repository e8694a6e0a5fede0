"""Weighted averages of flat vectors, accumulated in place one update at a time.

A flat vector (`FlatLike`) is either one 1-D tensor or the sequence of tensors whose
flattened concatenation it is, such as the floating entries of a state dict in layout
order. The sequence form lets the streaming path add each tensor of an update into its
slice of the accumulator, so no update is concatenated into a flat copy.

Precision: the sum is kept in float32, or in float64 when the global vector has float64
parts. Each update costs one in-place pass (`acc.add_(x, alpha=w)`). Against a
float64 reference, the relative error `||result - reference|| / ||reference||` for
1M-element updates measured 6e-8 for 10 updates, 1.9e-7 for 100 and 5.6e-7 for 1000
(`python benchmarks/aggregation.py accuracy`). It grows about as the square root of the
number of updates. Kahan summation kept it at 5e-8 but took 5 times as long as this sum
for 10 updates of 100M parameters, and a float64 sum needs twice the model's memory.
NOTE: from a few thousand updates per round on, the error may pass 1e-6 (an estimate
from the growth above, not a measurement).
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Iterable, Sequence

import torch

from fedserve.aggregation.errors import AggregationError

FlatLike = torch.Tensor | Sequence[torch.Tensor]

# Elements per step when an update's dtype differs from the accumulator's (float16 into
# float32, say). PyTorch widens the whole input into a temporary first, so working in
# steps keeps that temporary at 4 MiB (float32) instead of the size of the tensor.
_CAST_CHUNK = 1 << 20

# CPU accumulators of at least this size are mapped with transparent huge pages.
_HUGE_PAGE_MIN_BYTES = 8 << 20
_HUGE_PAGE_BYTES = 2 << 20


def flat_parts(flat: FlatLike) -> Sequence[torch.Tensor]:
    """Return the tensors of a flat vector in order, a 1-D tensor being its only part."""
    return (flat,) if isinstance(flat, torch.Tensor) else flat


def accumulation_dtype(flat: FlatLike) -> torch.dtype:
    """Return float64 if any part of `flat` is float64, else float32."""
    parts = flat_parts(flat)
    return torch.float64 if any(part.dtype == torch.float64 for part in parts) else torch.float32


def check_weight(weight: object, *, update_index: int) -> float:
    """Return `weight` as a float, raising AggregationError unless it is finite and >= 0."""
    if isinstance(weight, bool):
        raise AggregationError(
            f"Update {update_index} has weight {weight!r}. A weight is a sample size, a "
            "number of at least 0.",
            update_index=update_index,
        )
    try:
        value = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise AggregationError(
            f"Update {update_index} has weight {weight!r}, which is not a number. A weight "
            "is a sample size, a number of at least 0.",
            update_index=update_index,
        ) from None
    if not math.isfinite(value) or value < 0:
        raise AggregationError(
            f"Update {update_index} has weight {weight!r}. A weight is a sample size, a "
            "finite number of at least 0.",
            update_index=update_index,
        )
    return value


class WeightedSum:
    """A running weighted sum of flat vectors in one preallocated 1-D buffer."""

    def __init__(self, numel: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self._sum = empty_flat(numel, dtype=dtype, device=device)
        # Views of the sum shaped like the parts of the last update. Updates of one model
        # have the same shapes, so the views are made once, not once per update.
        self._targets: list[torch.Tensor] = []
        self._target_shapes: list[torch.Size] = []
        self._total_weight = 0.0
        self._count = 0
        self._finished = False

    @property
    def count(self) -> int:
        """Number of updates added, including those with weight 0."""
        return self._count

    def add(self, flat: FlatLike, weight: object) -> None:
        """Add `weight` times `flat` to the sum; an update with weight 0 is checked, not added."""
        if self._finished:
            raise RuntimeError("WeightedSum.add was called after average().")
        self._count += 1
        index = self._count
        value = check_weight(weight, update_index=index)
        parts = flat_parts(flat)
        self._check_parts(parts, index)
        if value == 0.0:
            return

        first = self._total_weight == 0.0
        for target, part in zip(self._targets_for(parts), parts, strict=True):
            _add_scaled(target, part, value, overwrite=first)
        self._total_weight += value

    def average(self) -> torch.Tensor:
        """Divide the sum by the total weight in place and return it; call once, at the end."""
        if self._count == 0:
            raise AggregationError("No updates were given, so there is nothing to average.")
        if self._total_weight == 0.0:
            raise AggregationError(
                f"The total weight of the {self._count} updates is 0, so there is nothing to "
                "average. Weights are sample sizes, and at least one update needs a weight "
                "above 0."
            )
        self._finished = True
        return self._sum.div_(self._total_weight)

    def _targets_for(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [part.shape for part in parts]
        if shapes != self._target_shapes:
            pieces = self._sum.split([part.numel() for part in parts])
            self._targets = [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]
            self._target_shapes = shapes
        return self._targets

    def _check_parts(self, parts: Sequence[torch.Tensor], index: int) -> None:
        numel = 0
        for part in parts:
            if not part.dtype.is_floating_point:
                raise AggregationError(
                    f"Update {index} has a part of dtype {part.dtype}. A flat vector contains "
                    "floating-point values only.",
                    update_index=index,
                )
            if part.device != self._sum.device:
                raise AggregationError(
                    f"Update {index} is on device {part.device}, but the global model is on "
                    f"{self._sum.device}. Move the update to that device.",
                    update_index=index,
                )
            numel += part.numel()
        if numel != self._sum.numel():
            raise AggregationError(
                f"Update {index} has {numel} elements, but the global model has "
                f"{self._sum.numel()}. An update must come from the global model's "
                "architecture.",
                update_index=index,
            )


def empty_flat(numel: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an uninitialized 1-D tensor, on transparent huge pages where Linux allows.

    The first write to a fresh 400 MB buffer takes 100,000 page faults with 4 KiB pages,
    which took longer than adding ten updates into it on the benchmark machine
    (`benchmarks/aggregation.py`). With 2 MiB pages it takes 200. Large CPU buffers
    therefore come from a private anonymous mapping marked MADV_HUGEPAGE, which takes
    effect when the kernel's THP mode is `always` or `madvise`. The tensor keeps the
    mapping alive, and the mapping is unmapped when the last view of it is freed.
    """
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype, device=device)

    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # A kernel without THP support raises OSError, and the mapping keeps normal pages.
    with contextlib.suppress(OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    # Start on a 2 MiB boundary, so that every part of the buffer can be a huge page.
    start = -raw.data_ptr() % _HUGE_PAGE_BYTES
    return raw[start : start + nbytes].view(dtype)


def weighted_average(
    global_flat: FlatLike, updates: Iterable[tuple[FlatLike, object]]
) -> torch.Tensor:
    """Return the average of the updates weighted by their weights, as a new 1-D tensor.

    `global_flat` sets the length, dtype (see `accumulation_dtype`) and device of the
    result, and its values do not enter the average. Each update is dropped before the
    next one is requested, so a lazy iterator keeps one update in memory at a time.
    """
    parts = flat_parts(global_flat)
    device = parts[0].device if parts else torch.device("cpu")
    total = WeightedSum(
        sum(part.numel() for part in parts), dtype=accumulation_dtype(parts), device=device
    )
    for update, weight in updates:
        total.add(update, weight)
        del update
    return total.average()


def _add_scaled(
    target: torch.Tensor, source: torch.Tensor, weight: float, *, overwrite: bool
) -> None:
    if source.dtype == target.dtype:
        if overwrite:
            torch.mul(source, weight, out=target)
        else:
            target.add_(source, alpha=weight)
        return

    # Mixed dtypes: go in steps to bound the temporary that widening allocates. The
    # product is formed in the target dtype, so float16 cannot overflow on large weights.
    target_steps = target.view(-1)
    source_steps = source.reshape(-1)
    for start in range(0, target_steps.numel(), _CAST_CHUNK):
        stop = start + _CAST_CHUNK
        step = target_steps[start:stop]
        if overwrite:
            step.copy_(source_steps[start:stop]).mul_(weight)
        else:
            step.add_(source_steps[start:stop], alpha=weight)
