"""Monte Carlo dropout: N forward passes with the dropout layers active.

Only dropout layers are put in training mode; every other layer stays in eval mode, so
BatchNorm uses its running statistics and never updates them. See Gal and Ghahramani,
"Dropout as a Bayesian Approximation" (2016).
"""

from __future__ import annotations

import torch

from fedserve.uncertainty.base import forward, stack_samples

# Class names of PyTorch's dropout layers. A TorchScript archive keeps a submodule's
# class name as `original_name`, which is the only way to recognise its layers.
DROPOUT_LAYER_NAMES = frozenset(
    {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}
)


def dropout_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the dropout submodules of a module or a TorchScript module.

    A Python layer is recognised by class, so subclasses of PyTorch's dropout layers
    count. A scripted layer is recognised by its `original_name`, so a scripted subclass
    with another class name is missed. Dropout called as a function inside a
    layer's forward follows that layer's `training` flag and so stays off.
    """
    return [
        submodule
        for submodule in module.modules()
        if isinstance(submodule, torch.nn.modules.dropout._DropoutNd)
        or getattr(submodule, "original_name", None) in DROPOUT_LAYER_NAMES
    ]


def sample(module: torch.nn.Module, model_input: torch.Tensor, n: int) -> torch.Tensor:
    """Return `n` outputs with dropout active, stacked as `[n, *output_shape]`.

    The module is left in eval mode afterwards.
    """
    if n < 1:
        raise ValueError(f"MC dropout needs at least one pass, got n={n}")
    module.eval()
    for layer in dropout_layers(module):
        layer.train(True)
    try:
        outputs = [forward(module, model_input) for _ in range(n)]
    finally:
        module.eval()
    return stack_samples(outputs)
