"""No uncertainty: one forward pass with the whole model in eval mode."""

from __future__ import annotations

import torch

from fedserve.uncertainty.base import forward, stack_samples


def sample(module: torch.nn.Module, model_input: torch.Tensor) -> torch.Tensor:
    """Return the model's output as a stack of one sample, `[1, *output_shape]`."""
    module.eval()
    return stack_samples([forward(module, model_input)])
