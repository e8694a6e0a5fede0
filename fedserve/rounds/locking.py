"""The one helper that takes a training's row lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from django.db import transaction

from fedserve.core.models import Training


@contextmanager
def locked_training(training_id: UUID | str) -> Iterator[Training | None]:
    """Open a transaction holding the training's row lock; yield the training, or None if gone.

    PostgreSQL locks the row with SELECT ... FOR UPDATE. SQLite has no row locks, but the
    settings open every transaction with BEGIN IMMEDIATE, which takes the database's write
    lock, so concurrent lifecycle transactions run one after another there too.
    """
    with transaction.atomic():
        training = (
            Training.objects.select_for_update(of=("self",))
            .select_related("model")
            .filter(pk=training_id)
            .first()
        )
        yield training
