"""Real fedserve processes for end-to-end tests, and a participant that speaks plain HTTP.

`Cluster` runs `fedserve serve` and `fedserve worker` processes on 127.0.0.1, either on the
embedded default (one server, SQLite in the data directory) or in production mode
(PostgreSQL, Redis, several servers and workers). `fresh_postgres_database` and
`redis_queue` create services for one test run and remove them afterwards, so no database,
queued task or lock is left behind for a later run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import torch

POSTGRES_URL = os.environ.get("FEDSERVE_TEST_POSTGRES", "")
REDIS_URL = os.environ.get("FEDSERVE_TEST_REDIS", "")

# Variables of the test run that must not leak into the processes under test.
_CLEARED = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "FEDSERVE_PRODUCTION",
    "FEDSERVE_STORAGE",
    "FEDSERVE_SECRET_KEY",
    "FEDSERVE_CELERY_QUEUE",
    "DJANGO_SETTINGS_MODULE",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Services


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty PostgreSQL database on FEDSERVE_TEST_POSTGRES; yield its URL; drop it."""
    import psycopg

    name = f"fedserve_e2e_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(POSTGRES_URL)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def redis_queue() -> Iterator[str]:
    """Yield a Celery queue name unique to this run; delete its messages and keys afterwards.

    Messages that a killed worker held stay in kombu's `unacked` hash and would be put back
    on the queue later, so they are removed too.
    """
    import redis

    name = f"fedserve-e2e-{secrets.token_hex(6)}"
    try:
        yield name
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = [name, f"_kombu.binding.{name}", *client.keys(f"*{name}*")]
            client.delete(*keys)
            for tag, raw in client.hgetall("unacked").items():
                if name.encode() in raw:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
        finally:
            client.close()


# Processes


class FedserveProcess:
    """One `python -m fedserve ...` child process, logging to a file."""

    def __init__(self, name: str, arguments: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.arguments = arguments
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedserve", *self.arguments],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def kill(self) -> None:
        """Kill the process and its children at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def terminate(self) -> None:
        """Ask the process to exit (SIGTERM); `stop` waits for it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self.process is None:
            return
        try:
            # Long enough for a clean exit; a process still busy then is killed.
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")


class Cluster:
    """fedserve servers (and, in production mode, workers) sharing one data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        servers: int = 1,
        workers: int = 0,
        database_url: str = "",
        broker_url: str = "",
        queue_name: str = "",
        environment: dict[str, str] | None = None,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        env = {key: value for key, value in os.environ.items() if key not in _CLEARED}
        env.update(
            {
                "FEDSERVE_DATA_DIR": str(data_dir),
                "FEDSERVE_LOG_LEVEL": "INFO",
                "FEDSERVE_ROUND_SWEEP_SECONDS": "1",
                "FEDSERVE_ROUND_LEASE_SECONDS": "3",
                "OMP_NUM_THREADS": "1",
            }
        )
        if database_url:
            env["DATABASE_URL"] = database_url
        if broker_url:
            env.update(
                {
                    "CELERY_BROKER_URL": broker_url,
                    "FEDSERVE_CELERY_QUEUE": queue_name,
                    "FEDSERVE_PRODUCTION": "true",
                    "FEDSERVE_SECRET_KEY": secrets.token_urlsafe(50),
                }
            )
        env.update(environment or {})
        self.env = env

        self.ports = [free_port() for _ in range(servers)]
        self.servers = [
            FedserveProcess(
                f"server {i}",
                ["serve", "--host", "127.0.0.1", "--port", str(port), "--threads", "16"],
                env,
                data_dir / f"server-{i}.log",
            )
            for i, port in enumerate(self.ports)
        ]
        # Only the first worker runs beat, so the periodic sweeps are scheduled once.
        self.workers = [
            FedserveProcess(
                f"worker {i}",
                ["worker", "--concurrency", "2"],
                {**env, "FEDSERVE_WORKER_BEAT": "true" if i == 0 else "false"},
                data_dir / f"worker-{i}.log",
            )
            for i in range(workers)
        ]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "fedserve", "manage", "migrate", "--verbosity", "0"],
            env=self.env,
            check=True,
            timeout=120,
        )

    def start(self) -> None:
        for process in [*self.servers, *self.workers]:
            process.start()
        for process, url in zip(self.servers, self.urls, strict=True):
            _wait_for_http(process, url)
        for process in self.workers:
            _wait_for_log(process, "ready.")

    def kill(self) -> None:
        for process in [*self.servers, *self.workers]:
            process.kill()

    def stop(self) -> None:
        processes = [*self.servers, *self.workers]
        for process in processes:
            process.terminate()
        for process in processes:
            process.stop()

    def log_text(self) -> str:
        return "".join(
            process.log.read_text(errors="replace")
            for process in [*self.servers, *self.workers]
            if process.log.exists()
        )

    def aggregations(self, training_id: str) -> int:
        """Count the aggregations of a training that the processes logged."""
        pattern = re.compile(rf"training {re.escape(training_id)} round \d+: aggregated ")
        return len(pattern.findall(self.log_text()))


def _wait_for_http(process: FedserveProcess, url: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            requests.get(f"{url}/api/schema/", timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(
        f"{process.name} did not answer on {url}:\n{process.log.read_text()[-3000:]}"
    )


def _wait_for_log(process: FedserveProcess, marker: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        process.check_alive()
        if marker in process.log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} did not log {marker!r}:\n{process.log.read_text()[-3000:]}")


# Calls of the HTTP API, written against the wire contract alone (no fedserve.client)


class Account:
    """A registered user and the token it authenticates with."""

    def __init__(self, url: str, username: str, **fields: Any) -> None:
        response = requests.post(
            f"{url}/api/users/",
            json={"username": username, "password": f"{username}-password-1", **fields},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        self.user: dict[str, Any] = response.json()
        self.id: str = self.user["id"]
        self.headers = {"Authorization": f"Token {self.user['token']}"}


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def upload_model(url: str, actor: Account, module: torch.nn.Module) -> str:
    response = requests.post(
        f"{url}/api/models/",
        headers=actor.headers,
        data={"name": "e2e model", "description": "end-to-end test model"},
        files={"model_file": ("model.pt", torchscript_bytes(module), "application/octet-stream")},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["model_id"])


def create_training(
    url: str, actor: Account, model_id: str, participants: list[Account], **fields: Any
) -> str:
    body = {
        "model_id": model_id,
        "target_num_updates": 1,
        "metric_names": ["accuracy"],
        "aggregation_method": "FedAvg",
        "clients": [p.id for p in participants],
        **fields,
    }
    response = requests.post(f"{url}/api/trainings/", headers=actor.headers, json=body, timeout=30)
    assert response.status_code == 201, response.text
    return str(response.json()["training_id"])


def start_training(url: str, actor: Account, training_id: str) -> None:
    response = requests.post(
        f"{url}/api/trainings/{training_id}/start/", headers=actor.headers, timeout=30
    )
    assert response.status_code == 202, response.text


def training_model_id(url: str, actor: Account, training_id: str) -> str:
    response = requests.get(
        f"{url}/api/trainings/{training_id}/", headers=actor.headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return str(response.json()["model"])


def upload_update(
    url: str,
    participant: Account,
    model_id: str,
    round_number: int,
    state: dict[str, torch.Tensor],
    sample_size: int,
) -> requests.Response:
    return requests.post(
        f"{url}/api/models/{model_id}/",
        headers=participant.headers,
        data={"round": round_number, "sample_size": sample_size},
        files={"model_file": ("update.pt", state_dict_bytes(state), "application/octet-stream")},
        timeout=120,
    )


def upload_metrics(url: str, participant: Account, model_id: str, value: float) -> None:
    response = requests.post(
        f"{url}/api/models/{model_id}/metrics/",
        headers=participant.headers,
        data={"metric_names": ["accuracy"], "metric_values": [value]},
        timeout=30,
    )
    assert response.status_code == 201, response.text


def download_state(url: str, participant: Account, model_id: str) -> dict[str, torch.Tensor]:
    response = requests.get(
        f"{url}/api/models/{model_id}/", headers=participant.headers, timeout=120
    )
    assert response.status_code == 200, response.text
    module = torch.jit.load(io.BytesIO(response.content))
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class Feed:
    """A participant's pulled notifications, read with long polling."""

    def __init__(self, participant: Account) -> None:
        self.participant = participant
        self.after = 0
        self.seen: list[dict[str, Any]] = []

    def pull(self, url: str, wait: float = 10) -> list[dict[str, Any]]:
        response = requests.get(
            f"{url}/api/users/myself/notifications/",
            headers=self.participant.headers,
            params={"after": self.after, "wait": wait},
            timeout=wait + 30,
        )
        assert response.status_code == 200, response.text
        page: list[dict[str, Any]] = response.json()
        if page:
            self.after = page[-1]["seq"]
            self.seen.extend(page)
        return page

    def wait_for(
        self, url: str, notification_type: str, *, timeout: float = 60, **body: Any
    ) -> dict[str, Any]:
        """Pull until a notification of that type (and body fields) arrives; return it."""
        deadline = time.monotonic() + timeout
        for message in self.seen:
            if _matches(message, notification_type, body):
                return message
        while time.monotonic() < deadline:
            for message in self.pull(url, wait=min(5.0, max(deadline - time.monotonic(), 0.1))):
                if _matches(message, notification_type, body):
                    return message
        raise AssertionError(
            f"no {notification_type} {body} for {self.participant.id} within {timeout} s; "
            f"seen {[(m['notification_type'], m['body']) for m in self.seen]}"
        )

    def count(self, notification_type: str, **body: Any) -> int:
        return sum(1 for message in self.seen if _matches(message, notification_type, body))


def _matches(message: dict[str, Any], notification_type: str, body: dict[str, Any]) -> bool:
    return message["notification_type"] == notification_type and all(
        message["body"].get(key) == value for key, value in body.items()
    )


class Receiver:
    """A webhook endpoint on 127.0.0.1 that queues every notification it accepts."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                message = json.loads(self.rfile.read(length))
                receiver.before_accepting(message)
                receiver.received.append(message)
                receiver.inbox.put(message)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def before_accepting(self, message: dict[str, Any]) -> None:
        """Run in the request's thread before the message is accepted; a subclass may wait."""

    def count(self, notification_type: str, **body: Any) -> int:
        return sum(1 for message in self.received if _matches(message, notification_type, body))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
