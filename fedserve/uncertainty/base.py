"""Exceptions and the forward pass shared by all uncertainty methods."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Model errors can carry a whole TorchScript traceback; the API message keeps the end.
_MAX_MESSAGE_CHARS = 1000


class UncertaintyError(Exception):
    """Base class of the errors that the uncertainty methods raise."""


class ForwardError(UncertaintyError):
    """Raised when a model's forward pass raises or returns something other than a tensor."""


class NonFiniteOutputError(UncertaintyError):
    """Raised when a model's output contains NaN or infinity."""


class SwagMomentsError(UncertaintyError):
    """Raised when SWAG moments do not fit the model's parameters or are not finite."""


def forward(module: Callable[[torch.Tensor], object], model_input: torch.Tensor) -> torch.Tensor:
    """Run one forward pass without autograd and return the output as a floating tensor.

    Raises ForwardError with the model's own message when the pass fails, because that
    message (usually a shape or dtype mismatch) shows the caller how to fix the input.
    """
    try:
        with torch.inference_mode():
            output = module(model_input)
    except Exception as error:  # model code may raise any exception type
        raise ForwardError(_model_message(error)) from error
    if not isinstance(output, torch.Tensor):
        raise ForwardError(
            f"the model returned {type(output).__name__}, but inference needs a single tensor"
        )
    if not output.is_floating_point():
        output = output.to(torch.float32)
    return output


def stack_samples(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Stack sampled outputs into `[samples, *output_shape]`, checking they are finite."""
    try:
        samples = torch.stack(outputs)
    except RuntimeError as error:
        shapes = sorted({str(list(output.shape)) for output in outputs})
        raise ForwardError(
            f"the sampled outputs have different shapes ({', '.join(shapes)}), so they "
            "cannot be averaged"
        ) from error
    if not bool(torch.isfinite(samples).all()):
        raise NonFiniteOutputError(
            "the model produced non-finite values (NaN or infinity) for this input; check "
            "the input's scale and the model's weights"
        )
    return samples


def _model_message(error: Exception) -> str:
    """Return the useful part of an exception from model code.

    TorchScript errors start with an interpreter traceback and end with the original
    exception ("RuntimeError: mat1 and mat2 shapes cannot be multiplied ..."), so only
    the text after the last exception name is kept.
    """
    message = str(error).strip() or type(error).__name__
    marker = message.rfind("Error: ")
    if "Traceback of TorchScript" in message and marker != -1:
        line_start = message.rfind("\n", 0, marker) + 1
        message = message[line_start:].strip()
    if len(message) > _MAX_MESSAGE_CHARS:
        message = "..." + message[-_MAX_MESSAGE_CHARS:]
    return message
