"""Events of the training life cycle, each named as the fact that happened.

`fedserve.rounds.switch` records an event once its facts are in the database (and, for an
aggregation, once the new files are stored). `fedserve.rounds.transitions` turns it into
the training's next phase and the notifications that announce it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainingStarted:
    """The actor started the training; its first round begins."""


@dataclasses.dataclass(frozen=True)
class DaisyChainRoundFinished:
    """FedDC: the updates of `round` are in and no aggregation is due; they are passed on."""

    round: int


@dataclasses.dataclass(frozen=True)
class RoundAggregated:
    """The updates of `round` were aggregated; the global model now has round `round + 1`."""

    round: int


@dataclasses.dataclass(frozen=True)
class SwagMomentsAveraged:
    """The participants' SWAG moments for `round` were averaged into the global model."""

    round: int


@dataclasses.dataclass(frozen=True)
class ModelTestFinished:
    """Every participant (or enough of them by the deadline) reported metrics for `round`."""

    round: int


@dataclasses.dataclass(frozen=True)
class RoundFailed:
    """The training cannot go on; `reason` is stored as the training's error reason."""

    reason: str


Event = (
    TrainingStarted
    | DaisyChainRoundFinished
    | RoundAggregated
    | SwagMomentsAveraged
    | ModelTestFinished
    | RoundFailed
)
