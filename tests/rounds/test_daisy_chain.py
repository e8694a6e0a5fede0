"""FedDC hand-over assignment: no participant continues its own model."""

from __future__ import annotations

import uuid

from fedserve.rounds.daisy_chain import assign_models, derangement


def test_derangement_has_no_fixed_point():
    for size in range(2, 12):
        items = sorted(uuid.uuid4() for _ in range(size))
        for seed in range(20):
            mapping = derangement(items, f"seed-{seed}")
            assert sorted(mapping.values()) == items
            assert all(mapping[item] != item for item in items)


def test_derangement_is_reproducible():
    items = sorted(uuid.uuid4() for _ in range(6))

    assert derangement(items, "training:3") == derangement(items, "training:3")


def test_derangement_of_one_item_is_identity():
    item = uuid.uuid4()

    assert derangement([item], "seed") == {item: item}


def test_assignment_serves_participants_without_update():
    owners = sorted(uuid.uuid4() for _ in range(3))
    late = uuid.uuid4()
    models = {owner: uuid.uuid4() for owner in owners}

    assignment = assign_models([*owners, late], models, "seed")

    assert set(assignment) == {*owners, late}
    for owner in owners:
        assert assignment[owner] != models[owner]
    assert assignment[late] in models.values()


def test_assignment_without_updates_is_empty():
    assert assign_models([uuid.uuid4()], {}, "seed") == {}
