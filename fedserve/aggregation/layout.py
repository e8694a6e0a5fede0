"""The flat layout of a state dict: where each floating-point entry sits in one 1-D buffer.

Aggregation works on one contiguous floating-point vector per model, so that each update
costs a few passes over memory, whatever the number of tensors. Parameters and floating
buffers (BatchNorm's running mean and variance) go into that vector in key order.
Integer and bool buffers (BatchNorm's `num_batches_tracked`) stay separate tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from fedserve.aggregation.errors import AggregationError


@dataclasses.dataclass(frozen=True)
class LayoutEntry:
    """One state-dict entry: its shape and dtype, and for floating entries its flat slice."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    floating: bool
    # Start and length of the entry's slice of the flat vector; 0 for integer entries.
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Key order, shapes and dtypes of a state dict, and the flat slice of each float entry.

    The flat vector is float64 when any entry is float64, else float32. Float16 and
    bfloat16 entries are widened to the flat dtype and narrowed back by `unflatten`.
    """

    entries: tuple[LayoutEntry, ...]
    dtype: torch.dtype
    device: torch.device
    # Number of elements of the flat vector.
    numel: int

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> FlatLayout:
        """Record the layout of `state`, raising AggregationError for an entry it cannot hold."""
        entries: list[LayoutEntry] = []
        offset = 0
        device: torch.device | None = None
        flat_dtype = torch.float32
        for key, tensor in state.items():
            _check_supported(key, tensor)
            if device is None:
                device = tensor.device
            elif tensor.device != device:
                raise AggregationError(
                    f"The global model has key {key!r} on device {tensor.device}, but earlier "
                    f"keys on {device}. Move the whole state dict to one device.",
                    key=key,
                )

            shape = tuple(tensor.shape)
            if tensor.dtype.is_floating_point:
                numel = math.prod(shape)
                entries.append(LayoutEntry(key, shape, tensor.dtype, True, offset, numel))
                offset += numel
                if tensor.dtype == torch.float64:
                    flat_dtype = torch.float64
            else:
                entries.append(LayoutEntry(key, shape, tensor.dtype, False, 0, 0))
        return cls(
            entries=tuple(entries),
            dtype=flat_dtype,
            device=device if device is not None else torch.device("cpu"),
            numel=offset,
        )

    @property
    def float_entries(self) -> tuple[LayoutEntry, ...]:
        return tuple(entry for entry in self.entries if entry.floating)

    @property
    def integer_entries(self) -> tuple[LayoutEntry, ...]:
        return tuple(entry for entry in self.entries if not entry.floating)

    def check(self, state: Mapping[str, torch.Tensor], *, update_index: int | None = None) -> None:
        """Raise AggregationError, naming the key, unless `state` has exactly this layout.

        Keys must match as a set, and each tensor must have the recorded shape, dtype and
        device. Key order does not matter.
        """
        subject = "The state dict" if update_index is None else f"Update {update_index}"
        for entry in self.entries:
            if entry.key not in state:
                raise AggregationError(
                    f"{subject} is missing key {entry.key!r}, which the global model has. "
                    "An update must contain exactly the keys of the global model.",
                    key=entry.key,
                    update_index=update_index,
                )
            self._check_entry(entry, state[entry.key], subject, update_index)

        if len(state) != len(self.entries):
            known = {entry.key for entry in self.entries}
            extra = next(key for key in state if key not in known)
            raise AggregationError(
                f"{subject} has key {extra!r}, which the global model does not have. "
                "An update must contain exactly the keys of the global model.",
                key=extra,
                update_index=update_index,
            )

    def float_tensors(self, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Return the floating entries of a checked state dict in flat order, without copying."""
        return [state[entry.key] for entry in self.entries if entry.floating]

    def integer_tensors(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the integer and bool entries of a checked state dict, without copying."""
        return {entry.key: state[entry.key] for entry in self.entries if not entry.floating}

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Copy the floating entries of `state` into a new contiguous 1-D tensor of `dtype`."""
        self.check(state)
        flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        for entry in self.float_entries:
            # copy_ widens half precision and follows any strides, with no temporary.
            flat[entry.offset : entry.offset + entry.numel].view(entry.shape).copy_(
                state[entry.key]
            )
        return flat

    def unflatten(
        self, flat: torch.Tensor, integers: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Build a state dict in the recorded key order from a flat vector and integer entries.

        Floating entries get their recorded dtype and shape. An entry whose dtype equals
        `flat.dtype` is a view into `flat`, not a copy, and other entries are new tensors.
        `integers` must contain exactly the integer and bool entries, with their shapes
        and dtypes.
        """
        if flat.dim() != 1 or flat.numel() != self.numel or not flat.dtype.is_floating_point:
            raise AggregationError(
                f"The flat tensor has shape {tuple(flat.shape)} and dtype {flat.dtype}, but "
                f"the layout needs a 1-D floating-point tensor of {self.numel} elements."
            )
        integer_keys = {entry.key for entry in self.integer_entries}
        if set(integers) != integer_keys:
            raise AggregationError(
                f"The integer entries have keys {sorted(integers)}, but the layout has "
                f"{sorted(integer_keys)}. Pass exactly the integer and bool entries."
            )

        state: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            if entry.floating:
                piece = flat[entry.offset : entry.offset + entry.numel].view(entry.shape)
                state[entry.key] = piece if piece.dtype == entry.dtype else piece.to(entry.dtype)
            else:
                self._check_entry(entry, integers[entry.key], "The integer entries", None)
                state[entry.key] = integers[entry.key]
        return state

    def _check_entry(
        self, entry: LayoutEntry, tensor: object, subject: str, update_index: int | None
    ) -> None:
        key = entry.key
        if not isinstance(tensor, torch.Tensor):
            raise AggregationError(
                f"{subject} has a {type(tensor).__name__} for key {key!r}, not a tensor.",
                key=key,
                update_index=update_index,
            )
        if tuple(tensor.shape) != entry.shape:
            raise AggregationError(
                f"{subject} has shape {tuple(tensor.shape)} for key {key!r}, but the global "
                f"model has {entry.shape}. An update must come from the global model's "
                "architecture.",
                key=key,
                update_index=update_index,
            )
        if tensor.dtype != entry.dtype:
            raise AggregationError(
                f"{subject} has dtype {tensor.dtype} for key {key!r}, but the global model "
                f"has {entry.dtype}. Convert the update to the dtypes of the global model.",
                key=key,
                update_index=update_index,
            )
        if tensor.device != self.device:
            raise AggregationError(
                f"{subject} has key {key!r} on device {tensor.device}, but the global model "
                f"is on {self.device}. Move the update to that device.",
                key=key,
                update_index=update_index,
            )
        if tensor.layout != torch.strided:
            raise AggregationError(
                f"{subject} has a {tensor.layout} tensor for key {key!r}. Convert it to a "
                "dense tensor.",
                key=key,
                update_index=update_index,
            )


def _check_supported(key: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise AggregationError(
            f"The global model has a {type(tensor).__name__} for key {key!r}, not a tensor.",
            key=key,
        )
    if tensor.layout != torch.strided:
        raise AggregationError(
            f"The global model has a {tensor.layout} tensor for key {key!r}. Aggregation "
            "supports dense tensors only.",
            key=key,
        )
    if tensor.dtype.is_complex:
        raise AggregationError(
            f"The global model has dtype {tensor.dtype} for key {key!r}. Aggregation supports "
            "real floating-point, integer and bool tensors only.",
            key=key,
        )
