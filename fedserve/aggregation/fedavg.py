"""FedAvg: the average of the local models, weighted by their sample sizes.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedserve.aggregation.weighted import FlatLike, weighted_average


def fedavg(global_flat: FlatLike, updates: Iterable[tuple[FlatLike, float]]) -> torch.Tensor:
    """Return the average of the updates weighted by their sample sizes.

    The global vector sets the length, dtype and device of the result. Its values do
    not enter the average.
    """
    return weighted_average(global_flat, updates)
