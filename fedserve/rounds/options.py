"""Training options: a typed, validated structure parsed from the `options` JSON object."""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Mapping
from typing import Any


# Error messages show values through reprlib.repr, which cuts long strings and deep
# structures, so that a 1 MB option does not come back as a 1 MB message.
class OptionsError(ValueError):
    """Raised for an unknown option or a value of the wrong type or range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UncertaintyOptions:
    """Sampling settings for inference: `N` stochastic passes, and whether outputs get a softmax."""

    N: int = 10
    softmax: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """Options of one training; every field has a default, so `{}` is valid."""

    # FedDC: local models are passed on between participants this many times per aggregation.
    daisy_chain_period: int = 1
    uncertainty: UncertaintyOptions = dataclasses.field(default_factory=UncertaintyOptions)
    skip_model_tests: bool = False
    # When false, only the final model is tested.
    model_test_after_each_round: bool = True
    delete_local_models_after_aggregation: bool = True
    # FedProx proximal term weight, sent to participants with each round.
    mu: float = 0.01
    # Round policy (see fedserve.rounds.deadlines): each phase that waits for participants
    # ends after this many seconds. It goes on if at least `min_updates` participants
    # delivered (1 when unset), and the training ends in state E otherwise.
    round_timeout_seconds: float | None = None
    min_updates: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> TrainingOptions:
        """Build options from JSON, raising OptionsError that names the option and value."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise OptionsError(
                f"options must be a JSON object, not {type(raw).__name__} "
                f"{reprlib.repr(raw)}; use {{}} for the defaults."
            )
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise OptionsError(
                f"Unknown option {reprlib.repr(unknown[0])}; "
                f"known options are {', '.join(sorted(known))}."
            )

        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "uncertainty":
                values[name] = _parse_uncertainty(value)
            elif name in {"daisy_chain_period"}:
                values[name] = _int(name, value, minimum=1)
            elif name == "min_updates":
                values[name] = None if value is None else _int(name, value, minimum=1)
            elif name == "round_timeout_seconds":
                values[name] = None if value is None else _number(name, value, positive=True)
            elif name == "mu":
                values[name] = _number(name, value, positive=False)
            else:
                values[name] = _bool(name, value)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_uncertainty(value: Any) -> UncertaintyOptions:
    if not isinstance(value, Mapping):
        raise OptionsError(
            f'options.uncertainty must be an object such as {{"N": 10, "softmax": true}}, '
            f"not {reprlib.repr(value)}."
        )
    unknown = sorted(set(value) - {"N", "softmax"})
    if unknown:
        raise OptionsError(
            f"Unknown option uncertainty.{unknown[0]}; known options are N and softmax."
        )
    fields: dict[str, Any] = {}
    if "N" in value:
        fields["N"] = _int("uncertainty.N", value["N"], minimum=1, maximum=10_000)
    if "softmax" in value:
        fields["softmax"] = _bool("uncertainty.softmax", value["softmax"])
    return UncertaintyOptions(**fields)


def _int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    # bool is a subclass of int in Python, but true is not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"options.{name} must be an integer, not {reprlib.repr(value)}.")
    if value < minimum or (maximum is not None and value > maximum):
        limit = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise OptionsError(f"options.{name} must be {limit}, not {value}.")
    return value


def _number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionsError(f"options.{name} must be a number, not {reprlib.repr(value)}.")
    if value != value or value in (float("inf"), float("-inf")):
        raise OptionsError(f"options.{name} must be finite, not {reprlib.repr(value)}.")
    if positive and value <= 0:
        raise OptionsError(f"options.{name} must be greater than 0, not {reprlib.repr(value)}.")
    if not positive and value < 0:
        raise OptionsError(f"options.{name} must not be negative, not {reprlib.repr(value)}.")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionsError(f"options.{name} must be true or false, not {reprlib.repr(value)}.")
    return value
