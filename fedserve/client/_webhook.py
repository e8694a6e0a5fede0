"""A small webhook receiver: a threaded HTTP server that queues the notifications it gets."""

from __future__ import annotations

import json
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from fedserve.client._notifications import Notification

logger = logging.getLogger("fedserve.client")

# Notifications are small JSON objects; a larger body is not one.
_MAX_BODY_BYTES = 1024 * 1024


class WebhookReceiver:
    """Receive notifications on `http://<host>:<port>/` and put them on `self.queue`.

    Every well-formed POST gets 200 once it is queued. A body that is not a
    notification gets 400, which the server treats as a rejection, so the receiver only
    rejects what no participant could act on. Use port 0 to pick a free port, then
    register `receiver.url` as the user's `message_endpoint`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.queue: queue.Queue[Notification] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY_BYTES:
                    self._respond(413, {"detail": "The notification body is too large."})
                    return
                raw = self.rfile.read(length)
                try:
                    notification = Notification.from_json(json.loads(raw or b"null"))
                except (ValueError, TypeError) as exc:
                    logger.warning("webhook rejected a malformed notification: %s", exc)
                    self._respond(400, {"detail": str(exc)})
                    return
                receiver.queue.put(notification)
                self._respond(200, {"detail": "Notification received."})

            def _respond(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("webhook %s " + format, self.address_string(), *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self) -> WebhookReceiver:
        """Serve in a background thread; return self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="fedserve-webhook", daemon=True
            )
            self._thread.start()
            logger.info("webhook receiver listens on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
