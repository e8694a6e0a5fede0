"""Turn a stack of sampled outputs into a prediction and its uncertainty values.

Conventions, for samples of shape `[N, *output_shape]`:

- `inference` is the mean over the N samples.
- `variance` is the population variance over the samples (divided by N, not N - 1).
  An ensemble of two members gives ((a - b) / 2)², and a single sample gives 0, where
  the sample variance would be undefined. `std` is its square root.
- When the last output dimension holds probabilities (at least two classes, every value
  non-negative, every row summing to 1 within `PROBABILITY_TOLERANCE`), or when softmax
  is requested, the entropies are added. They use the natural log and `torch.xlogy`, so
  0 · ln 0 counts as 0 exactly; no epsilon is added to the probabilities.
  - `predictive_entropy`: entropy of the mean probabilities.
  - `expected_entropy`: mean over the samples of each sample's entropy.
  - `mutual_info`: predictive minus expected entropy, clamped at 0 because rounding can
    leave a value just below 0 when the samples agree.
  Their shape is `output_shape` without the class dimension.
"""

from __future__ import annotations

import torch

PROBABILITY_TOLERANCE = 1e-4


def summarize(
    samples: torch.Tensor, *, softmax: bool = False, spread: bool = True
) -> dict[str, torch.Tensor]:
    """Return `inference` and the uncertainty values of a stack of sampled outputs.

    With `softmax`, each sample is turned into probabilities over its last dimension
    first, so `inference` is the mean of the probabilities. With `spread=False` (a
    single forward pass), only `inference` is returned.
    """
    if samples.dim() < 1 or samples.shape[0] < 1:
        raise ValueError(f"summarize needs at least one sample, got shape {list(samples.shape)}")
    if softmax:
        if samples.dim() < 2:
            raise ValueError("softmax needs outputs with at least one dimension")
        samples = torch.softmax(samples, dim=-1)

    mean = samples.mean(dim=0)
    result = {"inference": mean}
    if not spread:
        return result

    variance = samples.var(dim=0, correction=0)
    result["variance"] = variance
    result["std"] = variance.sqrt()

    if softmax or is_probabilities(samples):
        predictive = entropy(mean)
        expected = entropy(samples).mean(dim=0)
        result["predictive_entropy"] = predictive
        result["expected_entropy"] = expected
        result["mutual_info"] = (predictive - expected).clamp(min=0)
    return result


def is_probabilities(samples: torch.Tensor) -> bool:
    """Return whether every row along the last dimension is a probability distribution."""
    if samples.dim() < 2 or samples.shape[-1] < 2:
        return False
    if bool((samples < 0).any()):
        return False
    row_sums = samples.sum(dim=-1)
    return bool(((row_sums - 1).abs() <= PROBABILITY_TOLERANCE).all())


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Return the entropy in nats of each distribution along the last dimension."""
    return -torch.xlogy(probabilities, probabilities).sum(dim=-1)
