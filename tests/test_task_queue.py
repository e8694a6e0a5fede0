"""Scheduling tasks on a broker that cannot be reached."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.db import transaction
from kombu.exceptions import OperationalError

from fedserve import tasks
from fedserve.rounds.deadlines import CHECK_TASK


@pytest.fixture
def unreachable_broker(settings, monkeypatch) -> list[str]:
    """Route tasks to a broker whose every publish fails; return the names tried."""
    tried: list[str] = []

    def send_task(name: str, *args: Any, **kwargs: Any) -> None:
        tried.append(name)
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    settings.FEDSERVE_TASKS_EAGER = False
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    monkeypatch.setattr(tasks.app, "send_task", send_task)
    return tried


@pytest.mark.django_db(transaction=True)
def test_enqueue_on_commit_logs_unreachable_broker(unreachable_broker, caplog):
    with caplog.at_level(logging.WARNING, logger="fedserve.tasks"), transaction.atomic():
        tasks.enqueue_on_commit(CHECK_TASK, "training-id")

    assert unreachable_broker == [CHECK_TASK]
    (record,) = caplog.records
    assert "was not queued because the broker is unreachable" in record.getMessage()
    assert "training-id" in record.getMessage()


def test_enqueue_raises_on_unreachable_broker(unreachable_broker):
    with pytest.raises(OperationalError):
        tasks.enqueue(CHECK_TASK, "training-id")
