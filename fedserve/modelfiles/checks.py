"""Compare an update's state dict with the global model's, and count a module's parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def describe_mismatch(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]
) -> str | None:
    """Describe how `actual` differs from `expected` in keys, shapes or dtypes; None if not."""
    missing = [key for key in expected if key not in actual]
    if missing:
        return f"missing keys {_key_list(missing)}"
    unexpected = [key for key in actual if key not in expected]
    if unexpected:
        return f"unexpected keys {_key_list(unexpected)}"
    for key, reference in expected.items():
        tensor = actual[key]
        if tensor.shape != reference.shape:
            return (
                f"{key!r} has shape {list(tensor.shape)}, but the global model's has "
                f"{list(reference.shape)}"
            )
        if tensor.dtype != reference.dtype:
            return f"{key!r} has dtype {tensor.dtype}, but the global model's has {reference.dtype}"
    return None


def _key_list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(key) for key in keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def count_float_parameters(parameters: torch.nn.Module | Iterable[torch.Tensor]) -> int:
    """Count the values in a module's floating-point parameters (buffers excluded).

    Takes the module or its parameters, such as `ModuleLayout.parameters`.
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    return sum(p.numel() for p in parameters if p.is_floating_point())
