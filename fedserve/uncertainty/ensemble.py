"""Deep ensemble: one forward pass of every member in eval mode.

The spread of the members' outputs is the uncertainty; see Lakshminarayanan et al.,
"Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles" (2017).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedserve.uncertainty.base import forward, stack_samples


def sample(members: Iterable[torch.nn.Module], model_input: torch.Tensor) -> torch.Tensor:
    """Return the members' outputs stacked as `[members, *output_shape]`."""
    outputs = []
    for member in members:
        member.eval()
        outputs.append(forward(member, model_input))
    if not outputs:
        raise ValueError("an ensemble needs at least one member")
    return stack_samples(outputs)
