"""Child processes of the demo: the fedserve server and the participants."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import requests

logger = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """The demo cannot go on; the message names what failed and where its log is."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def check_port_free(port: int) -> None:
    """Raise DemoError when `port` on 127.0.0.1 is taken, before anything is started."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DemoError(
                f"Port {port} on 127.0.0.1 is not available ({exc.strerror}); choose another "
                "--port or leave it out to use a free one."
            ) from exc


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ChildProcess:
    """A child process whose output goes to a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        *,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        # Set by the demo for participants: the webhook port (0 to poll) and the file a
        # participant creates once it listens for notifications.
        self.webhook_port = 0
        self.ready_file: Path | None = None
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env),
        )

    def send_line(self, text: str) -> None:
        """Write one line to the child's standard input and close it."""
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.close()

    def failed(self) -> bool:
        code = self.process.poll()
        return code is not None and code != 0

    def exited(self) -> bool:
        return self.process.poll() is not None

    def describe_failure(self) -> str:
        return (
            f"{self.name} exited with status {self.process.returncode}; the end of "
            f"{self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, grace: float = 10.0) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            # A participant still waiting for its assignment exits on end of input.
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, grace)
                self.process.kill()
                self.process.wait()
        self._log.close()


def child_environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Each child computes on one thread, so the server and participants share the cores.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def start_server(data_dir: Path, port: int, log_path: Path) -> tuple[ChildProcess, str]:
    """Start `fedserve serve` on the embedded default; return it and its base URL once up."""
    env = child_environment(FEDSERVE_DATA_DIR=str(data_dir), FEDSERVE_LOG_LEVEL="INFO")
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "FEDSERVE_PRODUCTION", "FEDSERVE_STORAGE"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "fedserve",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = ChildProcess("the fedserve server", command, log_path, env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, base_url, timeout=90.0)
    except BaseException:
        server.stop()
        raise
    return server, base_url


def wait_until_up(server: ChildProcess, base_url: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.exited():
            raise DemoError(server.describe_failure())
        with contextlib.suppress(requests.RequestException):
            # Any HTTP response (401 without credentials) means the server accepts requests.
            requests.get(f"{base_url}/api/users/myself/", timeout=2)
            return
        time.sleep(0.2)
    raise DemoError(
        f"The fedserve server did not respond on {base_url} within {timeout:.0f} s; the end of "
        f"{server.log_path}:\n{tail(server.log_path)}"
    )


def stop_all(processes: Sequence[ChildProcess]) -> None:
    """Send SIGTERM to every process first, then wait for each, so they stop in parallel."""
    for child in processes:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in processes:
        child.stop()
