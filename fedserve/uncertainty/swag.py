"""SWAG (diagonal): N forward passes, each with weights drawn from a Gaussian.

The Gaussian has mean = the first moment of the weights and variance = second moment
minus first moment squared, both aggregated over the participants' SWA trajectories;
see Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning"
(2019). Each pass draws new, independent weights.

Parameter order: moments are flat vectors over the module's floating-point parameters
in `module.parameters()` order, each flattened row-major, as
`torch.nn.utils.parameters_to_vector(module.parameters())` builds them. This is the
state-dict order with the buffers (BatchNorm running statistics, counters) left out.
Buffers are not sampled and keep their stored values.
"""

from __future__ import annotations

import dataclasses

import torch

from fedserve.uncertainty.base import SwagMomentsError, forward, stack_samples

# Variance floor: second moment minus first moment squared can round to 0 or just below
# it for a weight that barely moved, and the square root of a negative value is NaN.
MIN_VARIANCE = 1e-30


@dataclasses.dataclass(frozen=True)
class SwagPosterior:
    """Mean and standard deviation of the diagonal Gaussian over the flat parameters."""

    mean: torch.Tensor
    std: torch.Tensor


def posterior_from_moments(
    first_moment: torch.Tensor, second_moment: torch.Tensor
) -> SwagPosterior:
    """Build the Gaussian from aggregated moments, raising SwagMomentsError if they are unusable."""
    for name, moment in (("first", first_moment), ("second", second_moment)):
        if not moment.is_floating_point():
            raise SwagMomentsError(f"the {name} moment has dtype {moment.dtype}, not a float type")
    if first_moment.numel() != second_moment.numel():
        raise SwagMomentsError(
            f"the first moment has {first_moment.numel()} values but the second moment has "
            f"{second_moment.numel()}"
        )
    mean = first_moment.detach().reshape(-1).clone()
    second = second_moment.detach().reshape(-1).to(mean.dtype)
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(second).all())):
        raise SwagMomentsError("the moments contain NaN or infinity")
    variance = (second - mean * mean).clamp(min=MIN_VARIANCE)
    return SwagPosterior(mean=mean, std=variance.sqrt())


def float_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    """Return the module's floating-point parameters in the order the moments use."""
    return [parameter for parameter in module.parameters() if parameter.is_floating_point()]


def sample(
    module: torch.nn.Module,
    model_input: torch.Tensor,
    posterior: SwagPosterior,
    n: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return `n` outputs, each with freshly sampled weights, as `[n, *output_shape]`.

    The weights are written into the module's parameters in place, so the model is not
    rebuilt per sample; the caller must hold the module exclusively. The stored weights
    are restored afterwards, also when a pass fails.
    """
    if n < 1:
        raise ValueError(f"SWAG needs at least one sample, got n={n}")
    parameters = float_parameters(module)
    count = sum(parameter.numel() for parameter in parameters)
    if count != posterior.mean.numel():
        raise SwagMomentsError(
            f"the moments have {posterior.mean.numel()} values but the model has {count} "
            "floating-point parameters"
        )

    module.eval()
    with torch.no_grad():
        stored = [parameter.detach().clone() for parameter in parameters]
        outputs = []
        try:
            for _ in range(n):
                noise = torch.randn(
                    count,
                    generator=generator,
                    dtype=posterior.mean.dtype,
                    device=posterior.mean.device,
                )
                _write_parameters(parameters, torch.addcmul(posterior.mean, posterior.std, noise))
                outputs.append(forward(module, model_input))
        finally:
            for parameter, value in zip(parameters, stored, strict=True):
                parameter.copy_(value)
    return stack_samples(outputs)


def _write_parameters(parameters: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.copy_(flat[offset : offset + size].view_as(parameter))
        offset += size
