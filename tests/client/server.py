"""A real `fedserve serve` process on 127.0.0.1 for SDK and end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_server(data_dir: Path, **environment: str) -> Iterator[str]:
    """Run `fedserve serve` on the embedded default in `data_dir`; yield its base URL."""
    port = free_port()
    env = dict(os.environ)
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "FEDSERVE_PRODUCTION", "FEDSERVE_STORAGE"):
        env.pop(name, None)
    env.update(
        {
            "FEDSERVE_DATA_DIR": str(data_dir),
            "FEDSERVE_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
            "DJANGO_SETTINGS_MODULE": "fedserve.settings",
            **environment,
        }
    )
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedserve", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(process, url, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fedserve serve exited early:\n{log_path.read_text()[-3000:]}")
        try:
            requests.get(f"{url}/api/users/myself/", timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"fedserve serve did not start on {url}:\n{log_path.read_text()[-3000:]}")
