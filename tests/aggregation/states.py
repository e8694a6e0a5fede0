"""Random state dicts with BatchNorm buffers, and the float64 reference average."""

from __future__ import annotations

import torch
from torch import nn


def make_global_state(*, half_head: bool = False) -> dict[str, torch.Tensor]:
    """Return the state dict of a small conv net with BatchNorm and a linear head."""
    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    if half_head:
        head = head.half()
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        head,
    )
    return {key: value.clone() for key, value in net.state_dict().items()}


def make_update(
    global_state: dict[str, torch.Tensor], seed: int, *, batches: int = 10
) -> dict[str, torch.Tensor]:
    """Return a random update with the global layout and integer buffers set to `batches`."""
    generator = torch.Generator().manual_seed(seed)
    update: dict[str, torch.Tensor] = {}
    for key, value in global_state.items():
        if value.dtype.is_floating_point:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            update[key] = (value.float() + noise).to(value.dtype)
        else:
            update[key] = torch.full_like(value, batches)
    return update


def reference_average(
    updates: list[tuple[dict[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """Return the float64 weighted average of the floating entries, key by key."""
    total = sum(weight for _, weight in updates)
    keys = [key for key, value in updates[0][0].items() if value.dtype.is_floating_point]
    return {
        key: sum(state[key].double() * weight for state, weight in updates) / total for key in keys
    }


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ||result - reference|| / ||reference||, computed in float64."""
    difference = result.double() - reference.double()
    return float(difference.norm() / reference.double().norm())
