"""Measure authenticated requests per second on `fedserve serve` (GET /api/users/myself/).

Starts a server on 127.0.0.1 with a fresh data directory, registers a user, and times
requests sequentially and from concurrent clients (one `requests.Session` per thread),
with the token header and with HTTP Basic (username and password). A second server with
the Basic credential cache turned off shows what one password hash costs per request.

    .venv/bin/python benchmarks/requests.py [--requests 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# This script shares its name with the requests package. Run as a script, its own folder
# comes first on sys.path and would shadow the package, so that folder is dropped.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import requests  # noqa: E402

PATH = "/api/users/myself/"


@dataclass(frozen=True)
class Result:
    label: str
    clients: int
    requests: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def row(self) -> str:
        ordered = sorted(self.latencies)
        median = statistics.median(ordered) * 1000
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000
        return (
            f"| {self.label} | {self.clients} | {self.requests} | {self.rate:8.1f} | "
            f"{median:7.1f} | {p95:7.1f} |"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_server(threads: int, cache_seconds: int) -> Iterator[str]:
    """Run `fedserve serve` on a free port with a fresh data directory; yield its base URL."""
    with tempfile.TemporaryDirectory(prefix="fedserve-bench-") as data_dir:
        port = free_port()
        env = {
            **os.environ,
            "FEDSERVE_DATA_DIR": data_dir,
            "FEDSERVE_THREADS": str(threads),
            "FEDSERVE_BASIC_AUTH_CACHE_SECONDS": str(cache_seconds),
            "FEDSERVE_LOG_LEVEL": "WARNING",
        }
        env.pop("DATABASE_URL", None)
        command = [sys.executable, "-m", "fedserve", "serve", "--host", "127.0.0.1"]
        server = subprocess.Popen(
            [*command, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base, server)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)


def wait_until_up(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"fedserve serve exited with status {server.returncode}")
        try:
            requests.get(f"{base}/api/schema/", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("fedserve serve did not accept connections within 60 seconds")


def register(base: str) -> tuple[str, str, str]:
    """Register a user and return (username, password, token)."""
    username = "bench-" + secrets.token_hex(4)
    password = secrets.token_urlsafe(16)
    response = requests.post(
        f"{base}/api/users/", json={"username": username, "password": password}, timeout=30
    )
    response.raise_for_status()
    return username, password, response.json()["token"]


def session_for(auth: tuple[str, str] | str) -> requests.Session:
    session = requests.Session()
    if isinstance(auth, str):
        session.headers["Authorization"] = f"Token {auth}"
    else:
        session.auth = auth
    return session


def run_sequential(label: str, url: str, auth: tuple[str, str] | str, count: int) -> Result:
    session = session_for(auth)
    session.get(url, timeout=30).raise_for_status()  # warm-up: connection and cache
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        session.get(url, timeout=30).raise_for_status()
        latencies.append(time.perf_counter() - began)
    return Result(label, 1, count, time.perf_counter() - start, latencies)


def run_concurrent(
    label: str, url: str, auth: tuple[str, str] | str, count: int, clients: int
) -> Result:
    per_client = max(1, count // clients)
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        session = session_for(auth)
        own: list[float] = []
        try:
            session.get(url, timeout=60).raise_for_status()
            ready.wait()
            for _ in range(per_client):
                began = time.perf_counter()
                session.get(url, timeout=60).raise_for_status()
                own.append(time.perf_counter() - began)
        except BaseException as error:  # reported after the run
            errors.append(error)
            ready.abort()
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{label}: {len(errors)} clients failed, first: {errors[0]!r}")
    return Result(label, clients, per_client * clients, seconds, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--threads", type=int, default=32, help="server request threads")
    parser.add_argument(
        "--uncached-requests",
        type=int,
        default=20,
        help="sequential Basic requests with the credential cache off (0 skips that run)",
    )
    args = parser.parse_args()

    results: list[Result] = []
    with running_server(args.threads, cache_seconds=60) as base:
        username, password, token = register(base)
        url = base + PATH
        for label, auth in (("Token", token), ("Basic", (username, password))):
            results.append(run_sequential(label, url, auth, args.requests))
            results.append(run_concurrent(label, url, auth, args.requests, args.concurrency))
    if args.uncached_requests > 0:
        with running_server(args.threads, cache_seconds=0) as base:
            username, password, _token = register(base)
            results.append(
                run_sequential(
                    "Basic, cache off", base + PATH, (username, password), args.uncached_requests
                )
            )

    print(f"GET {PATH} on fedserve serve (1 process, {args.threads} threads, SQLite)")
    print("| auth | clients | requests | requests/s | median ms | p95 ms |")
    print("|---|---|---|---|---|---|")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
