"""The task registry: eager mode, the in-process runner and the once-per-period guard."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from fedserve import tasks

_calls: list[tuple[str, ...]] = []
_ran = threading.Event()


@tasks.task("tests.record_call")
def record_call(*args: str) -> None:
    _calls.append(args)
    _ran.set()


@pytest.fixture(autouse=True)
def clear_calls():
    _calls.clear()
    _ran.clear()
    tasks._deferred.clear()


def test_registry_contains_lifecycle_tasks():
    assert "rounds.check_round" in tasks._functions
    assert "rounds.sweep" in tasks._functions
    assert "rounds.sweep" in tasks.app.conf.beat_schedule


def test_eager_mode_runs_task_inline(settings):
    settings.FEDSERVE_TASKS_EAGER = True

    tasks.enqueue("tests.record_call", "a")

    assert _calls == [("a",)]


def test_eager_mode_defers_delayed_task(settings):
    settings.FEDSERVE_TASKS_EAGER = True

    tasks.enqueue("tests.record_call", "later", countdown=30)
    assert _calls == []

    assert tasks.run_deferred() == 1
    assert _calls == [("later",)]


def test_unknown_task_is_rejected():
    with pytest.raises(KeyError, match="unknown task"):
        tasks.enqueue("tests.no_such_task")


def test_in_process_runner_runs_submitted_task():
    runner = tasks.InProcessRunner(threads=1)

    try:
        runner.submit("tests.record_call", ("threaded",), countdown=0.01)
        assert _ran.wait(5)
    finally:
        runner.close()

    assert _calls == [("threaded",)]


def test_in_process_runner_repeats_periodic_task(monkeypatch):
    monkeypatch.setitem(tasks._periodic, "tests.record_call", 0.02)
    runner = tasks.InProcessRunner(threads=1)
    try:
        for _ in range(2):
            assert _ran.wait(5)
            _ran.clear()
    finally:
        runner.close()

    assert len(_calls) >= 2
    assert set(_calls) == {()}


@pytest.mark.skipif(
    not os.environ.get("FEDSERVE_TEST_REDIS"), reason="FEDSERVE_TEST_REDIS names no Redis server"
)
def test_periodic_task_runs_once_per_period(settings, monkeypatch):
    import redis

    settings.CELERY_BROKER_URL = os.environ["FEDSERVE_TEST_REDIS"]
    name = f"tests.periodic.{uuid.uuid4().hex}"
    monkeypatch.setitem(tasks._periodic, name, 60)
    guarded = tasks._once_per_period(name, record_call)
    try:
        guarded()
        guarded()
    finally:
        redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(
            f"fedserve:periodic:{tasks.QUEUE}:{name}"
        )

    assert _calls == [()]


def test_stopped_runner_is_replaced_on_next_enqueue(settings):
    settings.CELERY_BROKER_URL = ""
    settings.FEDSERVE_TASKS_EAGER = False
    tasks.stop_in_process_runner()
    try:
        tasks.enqueue("tests.record_call", "first")
        assert _ran.wait(5)
        first = tasks._runner_instance
        tasks.stop_in_process_runner()
        assert tasks._runner_instance is None
    finally:
        tasks.stop_in_process_runner()

    assert first is not None
    assert _calls == [("first",)]
