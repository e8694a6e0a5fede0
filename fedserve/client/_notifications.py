"""Notifications a participant receives, by webhook or from the pull feed."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class NotificationType(enum.StrEnum):
    TRAINING_START = "TRAINING_START"
    UPDATE_ROUND_START = "UPDATE_ROUND_START"
    MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
    SWAG_ROUND_START = "SWAG_ROUND_START"
    CLIENT_REMOVED = "CLIENT_REMOVED"
    TRAINING_FINISHED = "TRAINING_FINISHED"


@dataclasses.dataclass(frozen=True)
class Notification:
    """One message from the server about a training.

    `type` is a NotificationType for the known types and the raw string otherwise, so a
    participant built against this version skips types added later instead of failing.
    `sequence` is the feed's sequence number (None for a webhook delivery).
    """

    type: NotificationType | str
    training_id: str | None
    round: int | None = None
    model_id: str | None = None
    body: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sequence: int | None = None

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], sequence: int | None = None) -> Notification:
        """Build a notification from the wire format; raise ValueError when it is malformed."""
        if not isinstance(payload, Mapping):
            raise ValueError(f"A notification must be a JSON object, not {payload!r}.")
        raw_type = payload.get("notification_type")
        if not isinstance(raw_type, str) or not raw_type:
            raise ValueError(f"The notification has no notification_type: {dict(payload)!r}.")
        body = payload.get("body") or {}
        if not isinstance(body, Mapping):
            raise ValueError(f"The notification body must be a JSON object, not {body!r}.")
        try:
            kind: NotificationType | str = NotificationType(raw_type)
        except ValueError:
            kind = raw_type
        round_number = body.get("round")
        training = payload.get("training_uuid")
        model = body.get("global_model_uuid")
        return cls(
            type=kind,
            training_id=str(training) if training else None,
            round=int(round_number) if round_number is not None else None,
            model_id=str(model) if model else None,
            body=dict(body),
            sequence=sequence,
        )

    @property
    def key(self) -> tuple[str, str | None, int | None, str | None]:
        """Identity of the event, equal for repeated deliveries of the same notification."""
        return (str(self.type), self.training_id, self.round, self.model_id)
