"""Uncertainty methods: each turns a model and an input into a stack of sampled outputs.

A method returns a tensor of shape `[samples, *output_shape]`; `summary.summarize` turns
that stack into the prediction (the mean) and its uncertainty values. The methods are
pure PyTorch and know nothing of the database or the model store:

- `none`: one forward pass in eval mode.
- `ensemble`: one forward pass per ensemble member.
- `mc_dropout`: N forward passes with only the dropout layers in training mode.
- `swag`: N forward passes, each with weights drawn from the SWAG Gaussian.

Errors a caller can cause (a forward pass that raises, an output that is not a tensor
or not finite, SWAG moments that do not fit the model) raise subclasses of
`UncertaintyError`.
"""

from fedserve.uncertainty.base import (
    ForwardError,
    NonFiniteOutputError,
    SwagMomentsError,
    UncertaintyError,
)
from fedserve.uncertainty.summary import summarize

__all__ = [
    "ForwardError",
    "NonFiniteOutputError",
    "SwagMomentsError",
    "UncertaintyError",
    "summarize",
]
