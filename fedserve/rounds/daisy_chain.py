"""FedDC daisy chaining: which participant continues training which local model.

Between two aggregations every participant receives another participant's local model of
the previous round and trains it further. The assignment is seeded by training and round,
so a re-run of the same switch sends the same models.
"""

from __future__ import annotations

import random
import uuid


def derangement(items: list[uuid.UUID], seed: str) -> dict[uuid.UUID, uuid.UUID]:
    """Map each item to another one: a random cyclic permutation (Sattolo's algorithm).

    A single item maps to itself, because no other item exists.
    """
    order = list(items)
    rng = random.Random(seed)
    for i in range(len(order) - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    # Sattolo's shuffle leaves one cycle through all positions, so no item stays in place.
    return {items[i]: order[i] for i in range(len(items))}


def assign_models(
    recipients: list[uuid.UUID], models_by_owner: dict[uuid.UUID, uuid.UUID], seed: str
) -> dict[uuid.UUID, uuid.UUID]:
    """Return, for each recipient, the id of the local model it continues training.

    A participant that uploaded a model gets another participant's model. One that uploaded
    none (it missed a deadline) gets any uploaded model, chosen by the same seed. Returns an
    empty mapping when no model was uploaded.
    """
    owners = sorted(models_by_owner)
    if not owners:
        return {}
    donor_of = derangement(owners, seed)
    rng = random.Random(f"{seed}:without-update")
    assignment: dict[uuid.UUID, uuid.UUID] = {}
    for recipient in sorted(recipients):
        donor = donor_of.get(recipient) or rng.choice(owners)
        assignment[recipient] = models_by_owner[donor]
    return assignment
