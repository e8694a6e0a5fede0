"""Background tasks: a Celery app in production, an in-process runner on the embedded default.

Code schedules work only through `enqueue` (or `enqueue_on_commit`). Tasks take ids, are
idempotent and are acknowledged late, so a task that dies with its worker runs again.
Without CELERY_BROKER_URL the same task functions run on threads of the serving process;
with the setting FEDSERVE_TASKS_EAGER (tests only) they run in the calling thread.
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from django.conf import settings
from django.db import close_old_connections, transaction
from kombu.exceptions import OperationalError as KombuOperationalError

logger = logging.getLogger(__name__)

# Modules that register tasks; imported by Celery workers and by the app's ready().
TASK_MODULES = ["fedserve.rounds.tasks", "fedserve.notify.tasks"]

QUEUE = os.environ.get("FEDSERVE_CELERY_QUEUE", "") or getattr(
    settings, "CELERY_TASK_DEFAULT_QUEUE", "fedserve"
)

app = Celery("fedserve")
app.conf.update(
    broker_url=settings.CELERY_BROKER_URL or "memory://",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    # Beat keeps its state beside the other data, not in the working directory.
    beat_schedule_filename=str(settings.DATA_DIR / f"celerybeat-schedule-{QUEUE}"),
)

_functions: dict[str, Callable[..., Any]] = {}
_periodic: dict[str, float] = {}
_deferred: list[tuple[str, tuple[Any, ...]]] = []


def task(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a function as a background task under `name` (Celery and in-process)."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        if name in _functions:
            raise ValueError(f"task {name!r} is registered twice")
        _functions[name] = function
        app.task(name=name, acks_late=True, reject_on_worker_lost=True)(
            _closing(_once_per_period(name, function))
        )
        return function

    return register


def periodic(name: str, every_seconds: float) -> None:
    """Run the registered task `name` every `every_seconds` seconds (Celery beat or in-process)."""
    _periodic[name] = every_seconds
    app.conf.beat_schedule = {
        task_name: {"task": task_name, "schedule": interval}
        for task_name, interval in _periodic.items()
    }
    if _runner_instance is not None:
        _runner_instance.schedule_periodic(name)


def enqueue(name: str, *args: Any, countdown: float = 0.0) -> None:
    """Schedule task `name` with JSON-serialisable `args`, after `countdown` seconds.

    In eager mode a task without countdown runs at once in the calling thread, and a
    delayed one is kept for `run_deferred`.
    """
    if name not in _functions:
        raise KeyError(f"unknown task {name!r}")
    if getattr(settings, "FEDSERVE_TASKS_EAGER", False):
        if countdown > 0:
            _deferred.append((name, tuple(args)))
        else:
            _functions[name](*args)
    elif settings.CELERY_BROKER_URL:
        app.send_task(name, args=list(args), countdown=countdown or None)
    else:
        _runner().submit(name, tuple(args), countdown)


def enqueue_on_commit(name: str, *args: Any, countdown: float = 0.0) -> None:
    """Schedule a task once the current transaction commits (at once outside a transaction).

    The data is committed by then, so a broker that cannot be reached is logged, not raised
    (raising would turn a stored upload into a 500 response). The tasks scheduled this way, round
    checks and webhook deliveries, are scheduled again by their periodic sweeps.
    """
    transaction.on_commit(lambda: _enqueue_committed(name, args, countdown))


def _enqueue_committed(name: str, args: tuple[Any, ...], countdown: float) -> None:
    try:
        enqueue(name, *args, countdown=countdown)
    except KombuOperationalError as error:
        logger.warning(
            "task %s %s was not queued because the broker is unreachable (%s); "
            "its periodic sweep will schedule it again",
            name,
            list(args),
            error,
        )


def run_now(name: str, *args: Any) -> Any:
    """Run a task in the calling thread; for tests and management commands."""
    return _closing(_functions[name])(*args)


def run_deferred() -> int:
    """Run the delayed tasks that eager mode kept, in order; return how many ran."""
    count = 0
    while _deferred:
        name, args = _deferred.pop(0)
        _functions[name](*args)
        count += 1
    return count


def import_task_modules() -> None:
    """Import every module in TASK_MODULES that exists, so that its tasks are registered."""
    for module in TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def start_in_process_runner() -> None:
    """Start the in-process runner and its periodic tasks, unless a broker is configured.

    `fedserve serve` calls this in each server process, so that the periodic sweep also runs
    after a restart before any request has scheduled work.
    """
    if settings.CELERY_BROKER_URL or getattr(settings, "FEDSERVE_TASKS_EAGER", False):
        return
    _runner()


def stop_in_process_runner() -> None:
    """Stop the in-process runner, if one runs; the next `enqueue` starts a new one.

    Tests call this so that periodic tasks of a runner that an earlier test started do not
    run next to their own.
    """
    global _runner_instance
    with _runner_lock:
        runner, _runner_instance = _runner_instance, None
    if runner is not None:
        runner.close()


def _closing(function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task so that it never reuses a database connection that went stale."""

    def run(*args: Any) -> Any:
        close_old_connections()
        try:
            return function(*args)
        finally:
            close_old_connections()

    run.__name__ = function.__name__
    run.__doc__ = function.__doc__
    return run


def _once_per_period(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Skip a periodic Celery task that another beat already started in this period.

    Every worker started with beat schedules the periodic tasks. A Redis key that expires
    after most of the period lets only the first of them run. Other tasks pass through.
    """

    def run(*args: Any) -> Any:
        interval = _periodic.get(name)
        if interval is None or args or not settings.CELERY_BROKER_URL.startswith("redis"):
            return function(*args)
        import redis

        client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        try:
            key = f"fedserve:periodic:{QUEUE}:{name}"
            if not client.set(key, "1", nx=True, px=max(int(interval * 800), 1)):
                logger.debug("periodic task %s already ran in this period", name)
                return None
        finally:
            client.close()
        return function(*args)

    run.__name__ = function.__name__
    run.__doc__ = function.__doc__
    return run


class InProcessRunner:
    """Runs tasks on a thread pool of the serving process, with delays and periodic tasks."""

    def __init__(self, threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedserve-task")
        self._queue: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._sequence = itertools.count()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._schedule, name="fedserve-tasks", daemon=True)
        self._thread.start()
        for name in _periodic:
            self.schedule_periodic(name)

    def submit(self, name: str, args: tuple[Any, ...], countdown: float) -> None:
        self._push(time.monotonic() + max(countdown, 0.0), name, tuple(args))

    def schedule_periodic(self, name: str) -> None:
        self._push(time.monotonic() + _periodic[name], name, ())

    def close(self) -> None:
        """Stop scheduling: queued and periodic tasks that are not running yet are dropped."""
        with self._wakeup:
            self._closed = True
            self._queue.clear()
            self._wakeup.notify()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _push(self, due: float, name: str, args: tuple[Any, ...]) -> None:
        with self._wakeup:
            heapq.heappush(self._queue, (due, next(self._sequence), name, args))
            self._wakeup.notify()

    def _schedule(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and (
                    not self._queue or self._queue[0][0] > time.monotonic()
                ):
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._wakeup.wait(timeout)
                if self._closed:
                    return
                _due, _seq, name, args = heapq.heappop(self._queue)
            if name in _periodic and not args:
                self._push(time.monotonic() + _periodic[name], name, ())
            self._pool.submit(self._run, name, args)

    def _run(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            _closing(_functions[name])(*args)
        except Exception:
            logger.exception("task %s%r failed", name, args)


_runner_instance: InProcessRunner | None = None
_runner_lock = threading.Lock()


def _runner() -> InProcessRunner:
    global _runner_instance
    with _runner_lock:
        if _runner_instance is None:
            _runner_instance = InProcessRunner()
        return _runner_instance
