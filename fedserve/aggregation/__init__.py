"""Aggregation: pure functions from local models and their weights to a new global model.

Strategies work on flat vectors (see `weighted`), are registered by name (see
`registry`), and never touch the database or the model store. `aggregate` is the
entry point of the round logic: it checks each state dict against the global layout,
streams updates into one accumulator and rebuilds a state dict (see `streaming` for
the rule for integer buffers). `average_swag_moments` averages SWAG statistics.
"""

from fedserve.aggregation.errors import AggregationError
from fedserve.aggregation.layout import FlatLayout, LayoutEntry
from fedserve.aggregation.registry import STRATEGIES, Strategy, get_strategy
from fedserve.aggregation.streaming import aggregate
from fedserve.aggregation.swag import average_swag_moments
from fedserve.aggregation.weighted import FlatLike, WeightedSum, weighted_average

__all__ = [
    "STRATEGIES",
    "AggregationError",
    "FlatLayout",
    "FlatLike",
    "LayoutEntry",
    "Strategy",
    "WeightedSum",
    "aggregate",
    "average_swag_moments",
    "get_strategy",
    "weighted_average",
]
