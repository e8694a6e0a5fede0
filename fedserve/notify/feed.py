"""The pull feed: a user's notifications after a sequence number, with long polling."""

from __future__ import annotations

import time
from typing import Any

from django.db import connection

from fedserve.core.models import Notification

PAGE_SIZE = 100
MAX_WAIT_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.25


def notifications_after(
    recipient_id: Any, after: int, limit: int = PAGE_SIZE
) -> list[Notification]:
    """Return up to `limit` of the recipient's notifications with id > `after`, oldest first."""
    queryset = Notification.objects.filter(recipient_id=recipient_id, id__gt=after).order_by("id")
    return list(queryset[:limit])


def wait_for_notifications(
    recipient_id: Any, after: int, wait_seconds: float, limit: int = PAGE_SIZE
) -> list[Notification]:
    """Return the next page of notifications, waiting up to `wait_seconds` for the first one.

    The database is checked every POLL_INTERVAL_SECONDS. On a database server the
    connection is closed between checks, so a waiting request does not hold one of the
    server's connections. An SQLite connection is only a file handle in this process, and
    opening one again (functions registered, PRAGMAs run) cost about ten times the query
    itself in a profile of benchmarks/load.py, so it stays open.
    """
    deadline = time.monotonic() + min(wait_seconds, MAX_WAIT_SECONDS)
    reconnect = connection.vendor != "sqlite"
    while True:
        page = notifications_after(recipient_id, after, limit)
        remaining = deadline - time.monotonic()
        if page or remaining <= 0:
            return page
        if reconnect and not connection.in_atomic_block:
            connection.close()
        time.sleep(min(POLL_INTERVAL_SECONDS, remaining))
