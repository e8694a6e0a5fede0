"""Shared fixtures for the bad-input catalogue: a training in progress and a state snapshot."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth.models import Group
from rest_framework.authtoken.models import Token

from fedserve.core.models import Model, RoundPhase, Training, TrainingState, User
from tests.factories import make_global_model, make_training, make_user


@dataclass
class World:
    """An actor's model in round 2 of an ongoing training with one participant."""

    actor: User
    participant: User
    stranger: User
    model: Model
    training: Training
    group: Group


@pytest.fixture
def world(model_store) -> World:
    actor, participant, stranger = make_user(), make_user(), make_user()
    model = make_global_model(actor, round=2)
    training = make_training(
        actor,
        [participant],
        model=model,
        state=TrainingState.ONGOING,
        phase=RoundPhase.UPDATE,
        phase_round=2,
    )
    group = Group.objects.create(name="members")
    actor.groups.add(group)
    return World(actor, participant, stranger, model, training, group)


def database_rows() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of fedserve's tables, auth groups and tokens, in primary-key order."""
    tables = [*apps.get_app_config("core").get_models(), Group, Token]
    return {
        table._meta.label: [tuple(row.values()) for row in table.objects.order_by("pk").values()]
        for table in tables
    }


def stored_files(folder: Path) -> dict[str, str]:
    """Path and SHA-256 of every file below `folder`."""
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root, name)
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@dataclass
class Snapshot:
    rows: dict[str, list[tuple[Any, ...]]]
    files: dict[str, str]


@pytest.fixture
def unchanged(model_store):
    """Return a function that asserts database rows and stored files equal those at its first use.

    Call it once before the request (it takes the snapshot) and once after (it compares).
    """
    first_snapshot: list[Snapshot] = []

    def check() -> None:
        now = Snapshot(database_rows(), stored_files(model_store))
        if not first_snapshot:
            first_snapshot.append(now)
            return
        before = first_snapshot[0]
        for label in before.rows:
            assert now.rows[label] == before.rows[label], f"rows of {label} changed"
        assert now.files == before.files

    return check


@pytest.fixture
def round_hooks(monkeypatch) -> list[tuple[Any, ...]]:
    """Record the calls views make to fedserve.rounds instead of running the life cycle."""
    calls: list[tuple[Any, ...]] = []
    for name in ("local_model_uploaded", "metrics_uploaded", "swag_statistic_uploaded"):
        monkeypatch.setattr(
            f"fedserve.rounds.{name}", lambda *args, _name=name: calls.append((_name, *args))
        )
    return calls
