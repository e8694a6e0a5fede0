"""Settings of the demo and of local training; importing them loads no PyTorch."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """Local training: plain SGD with momentum, the same for participants and baselines."""

    epochs: int = 5
    learning_rate: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    # FedProx's proximal term weight; 0 is plain local training.
    mu: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
    participants: int = 5
    rounds: int = 10
    aggregation: str = "FedAvg"
    uncertainty: str = "MC_DROPOUT"
    seed: int = 0
    mode: str = "mixed"
    output: Path = Path("fedserve-demo")
    port: int | None = None
    epochs: int = TrainingSettings.epochs
    learning_rate: float = TrainingSettings.learning_rate
    alpha: float = 0.5
    daisy_chain_period: int = 2
    timeout: float = 900.0

    def participant_mode(self, index: int) -> str:
        """Return poll or webhook; a mixed demo alternates, starting with webhook."""
        if self.mode == "mixed":
            return "webhook" if index % 2 == 0 else "poll"
        return self.mode

    def is_aggregation_round(self, round_number: int) -> bool:
        """Tell whether the global model changed in this round (not a FedDC chain step)."""
        if round_number < 1:
            return False
        if self.aggregation == "FedDC":
            return round_number % self.daisy_chain_period == 0
        return True

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["output"] = str(self.output)
        return values
