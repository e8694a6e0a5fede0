"""FedProx: FedAvg with a proximal term in each participant's local objective.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127

The proximal term `mu / 2 * ||w - w_global||^2` changes local training only, so the
server step is FedAvg's weighted average. The training option `mu` goes to the
participants in the round notification and is not an input of this module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedserve.aggregation.weighted import FlatLike, weighted_average


def fedprox(global_flat: FlatLike, updates: Iterable[tuple[FlatLike, float]]) -> torch.Tensor:
    """Return the average of the updates weighted by their sample sizes, as FedAvg does."""
    return weighted_average(global_flat, updates)
