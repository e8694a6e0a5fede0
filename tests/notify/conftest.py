"""Fixtures for delivery tests: a scripted webhook server, recorded tasks and rounds hooks."""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import fedserve.rounds
import fedserve.tasks

# A scripted response that makes the server read the request and never respond.
HANG = "hang"


@dataclass
class Received:
    path: str
    payload: dict[str, Any]
    authorization: str | None


class WebhookServer:
    """An HTTP server on 127.0.0.1 that records POSTs and responds as scripted.

    Each request takes the next scripted response, a status code or HANG. When the script
    is empty, the server responds with 200.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: deque[int | str] = deque()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                server.received.append(
                    Received(self.path, payload, self.headers.get("Authorization"))
                )
                scripted = server.script.popleft() if server.script else 200
                if scripted == HANG:
                    server.release.wait(10)
                    return
                self.send_response(int(scripted))
                if 300 <= int(scripted) < 400:
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def respond_with(self, *responses: int | str) -> None:
        self.script.extend(responses)

    def types_received(self) -> list[str]:
        return [request.payload["notification_type"] for request in self.received]

    def close(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def webhook_server():
    server = WebhookServer()
    yield server
    server.close()


@dataclass
class Scheduled:
    name: str
    args: tuple[Any, ...]
    countdown: float


@pytest.fixture
def scheduled(monkeypatch) -> list[Scheduled]:
    """Record tasks instead of running them, so each test drives delivery step by step."""
    calls: list[Scheduled] = []

    def record(name: str, *args: Any, countdown: float = 0.0) -> None:
        calls.append(Scheduled(name, args, countdown))

    monkeypatch.setattr(fedserve.tasks, "enqueue", record)
    return calls


@pytest.fixture
def rounds_hooks(monkeypatch) -> dict[str, list[tuple[Any, Any]]]:
    """Replace the life-cycle hooks that delivery calls, and record their calls."""
    calls: dict[str, list[tuple[Any, Any]]] = {"rejected": [], "unreachable": []}
    monkeypatch.setattr(
        fedserve.rounds,
        "participant_rejected",
        lambda training_id, user_id: calls["rejected"].append((training_id, user_id)),
        raising=False,
    )
    monkeypatch.setattr(
        fedserve.rounds,
        "participant_unreachable",
        lambda training_id, user_id: calls["unreachable"].append((training_id, user_id)),
        raising=False,
    )
    return calls


@pytest.fixture
def fast_webhooks(settings):
    """Short timeouts and backoff, so retries and timeouts take milliseconds."""
    settings.FEDSERVE_WEBHOOK_CONNECT_TIMEOUT_SECONDS = 1.0
    settings.FEDSERVE_WEBHOOK_TIMEOUT_SECONDS = 0.3
    settings.FEDSERVE_WEBHOOK_MAX_ATTEMPTS = 3
    settings.FEDSERVE_WEBHOOK_BACKOFF_SECONDS = 0.01
    settings.FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS = 0.04
    return settings
