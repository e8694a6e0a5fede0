"""The exception that aggregation raises for inputs it cannot combine."""

from __future__ import annotations


class AggregationError(ValueError):
    """Raised when updates cannot be aggregated: a layout mismatch, a bad weight, no weight.

    `key` is the state-dict key at fault and `update_index` the 1-based position of the
    update in the iteration order, when the error concerns one key or one update.
    """

    def __init__(
        self, message: str, *, key: str | None = None, update_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.update_index = update_index
