"""Serializer fields shared by the API's serializers."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

# Maximum length of the repr of a rejected value that an error message repeats.
MAX_ECHOED_CHARS = 100


def shortened(value: Any) -> str:
    """Return repr(value), cut to MAX_ECHOED_CHARS characters for an error message."""
    text = repr(value)
    if len(text) <= MAX_ECHOED_CHARS:
        return text
    return f"{text[:MAX_ECHOED_CHARS]}... ({len(text)} characters)"


class IdField(serializers.UUIDField):
    """A UUID whose error message shows the rejected value."""

    def to_internal_value(self, data: Any) -> Any:
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError:
            raise serializers.ValidationError(
                f"{shortened(data)} is not a valid UUID; send the record's `id` as a "
                "canonical UUID string.",
                code="invalid",
            ) from None
