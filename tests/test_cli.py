"""The `fedserve` command's handling of invalid configuration, and its serve options."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

import pytest

from tests.client.server import running_server


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FEDSERVE_WORKERS", "abc", "FEDSERVE_WORKERS='abc' is not an integer"),
        ("FEDSERVE_LOG_LEVEL", "loud", "FEDSERVE_LOG_LEVEL='loud' is not a log level"),
        ("DATABASE_URL", "nonsense", "DATABASE_URL='nonsense' is invalid"),
        ("FEDSERVE_PRODUCTION", "maybe", "FEDSERVE_PRODUCTION='maybe' is not a boolean"),
    ],
)
def test_invalid_configuration_exits_with_one_line(tmp_path, variable, value, message):
    env = {**os.environ, "FEDSERVE_DATA_DIR": str(tmp_path), variable: value}
    env.pop("DJANGO_SETTINGS_MODULE", None)

    completed = subprocess.run(
        [sys.executable, "-m", "fedserve", "manage", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert completed.returncode == 1
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def idle_connection_after_response(url: str) -> socket.socket:
    """Return a connection to `url` that has received one complete response and is idle."""
    port = int(url.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(
        f"GET /api/schema/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("ascii")
    )
    reader = connection.makefile("rb")
    headers = {}
    assert reader.readline().startswith(b"HTTP/1.1 200")
    while (line := reader.readline().strip()) != b"":
        name, value = line.split(b":", 1)
        headers[name.strip().lower()] = value.strip()
    reader.read(int(headers[b"content-length"]))
    return connection


@pytest.mark.e2e
@pytest.mark.parametrize(("keepalive", "closed_after_pause"), [("1", True), ("10", False)])
def test_serve_keepalive_closes_idle_connections(tmp_path, keepalive, closed_after_pause):
    # gunicorn's default keep-alive is 2 s, so a connection still open after a pause of 4 s
    # shows that the setting reached gunicorn.
    with running_server(tmp_path / "data", FEDSERVE_KEEPALIVE_SECONDS=keepalive) as url:
        connection = idle_connection_after_response(url)
        with connection:
            readable, _, _ = select.select([connection], [], [], 4)
            if closed_after_pause:
                assert readable, "the server kept the idle connection open"
                assert connection.recv(1) == b""
            else:
                assert not readable, "the server closed or wrote to the idle connection"
