"""A scripted HTTP server on 127.0.0.1 for SDK tests that need exact server behaviour."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedServer:
    """Respond with (status, JSON body) pairs from a list in order, and record each request."""

    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                server.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
                status, payload = server.answers.pop(0) if server.answers else (500, None)
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[ScriptedServer]:
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join()


# What ConnectionScript does with one request on a connection.
RESPOND = "respond"
CLOSE_ON_ARRIVAL = "close on arrival"
CLOSE_AFTER_BODY = "close after body"


class ConnectionScript:
    """An HTTP/1.1 server on 127.0.0.1 that follows a script per connection and request.

    The n-th accepted connection takes the n-th list of actions, one per request on it.
    Each request is recorded with its connection number. The actions:

    - `(RESPOND, status, body)` sends a JSON response and keeps the connection open.
    - `(CLOSE_ON_ARRIVAL,)` closes the connection as soon as the request's first bytes
      arrive, as a server does whose keep-alive timeout ends at that moment.
    - `(CLOSE_AFTER_BODY,)` reads the whole request and closes without a response, as when
      a response is lost.
    """

    def __init__(self, connections: list[list[tuple[Any, ...]]]) -> None:
        self.connections = list(connections)
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []

    @contextmanager
    def running(self) -> Iterator[ConnectionScript]:
        acceptor = threading.Thread(target=self._accept, daemon=True)
        acceptor.start()
        try:
            yield self
        finally:
            self.listener.close()
            acceptor.join()
            for thread in self._threads:
                thread.join(10)

    def _accept(self) -> None:
        for number, actions in enumerate(self.connections):
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(number, connection, actions))
            thread.start()
            self._threads.append(thread)

    def _serve(
        self, number: int, connection: socket.socket, actions: list[tuple[Any, ...]]
    ) -> None:
        with connection, connection.makefile("rb") as reader:
            for action in actions:
                if action[0] == CLOSE_ON_ARRIVAL:
                    connection.recv(1, socket.MSG_PEEK)
                    self.requests.append({"connection": number, "complete": False})
                    return
                request = _read_request(reader)
                request.update(connection=number, complete=True)
                self.requests.append(request)
                if action[0] == CLOSE_AFTER_BODY:
                    return
                _, status, payload = action
                data = json.dumps(payload).encode()
                connection.sendall(
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )


def _read_request(reader: Any) -> dict[str, Any]:
    method, path, _ = reader.readline().decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := reader.readline().decode("latin-1").strip()) != "":
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    return {"method": method, "path": path, "headers": headers, "body": body}
