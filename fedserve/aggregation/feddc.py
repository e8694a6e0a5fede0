"""FedDC (federated daisy-chaining): aggregation interleaved with passing models on.

Kamp, Fischer and Vreeken, "Federated Learning from Small Datasets", ICLR 2023,
https://arxiv.org/abs/2110.03469

Between two aggregations the server sends each local model on to another participant
for more training (the daisy chain), `daisy_chain_period` times. That permutation is
round logic and happens in `fedserve.rounds`. The aggregation step itself is the
average of the local models, weighted by sample size as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedserve.aggregation.weighted import FlatLike, weighted_average


def feddc(global_flat: FlatLike, updates: Iterable[tuple[FlatLike, float]]) -> torch.Tensor:
    """Return the average of the daisy-chained local models, weighted by sample size."""
    return weighted_average(global_flat, updates)
