"""Faults during a training: the server killed in the middle of an upload, the broker restarted.

Each test runs real fedserve processes on 127.0.0.1, causes one fault, and checks the
state that fedserve defines for it: nothing half-stored, and a training that still
finishes with one aggregation per round and every notification delivered once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.e2e.cluster import (
    POSTGRES_URL,
    Account,
    Cluster,
    FedserveProcess,
    Feed,
    Receiver,
    create_training,
    download_state,
    free_port,
    fresh_postgres_database,
    start_training,
    state_dict_bytes,
    training_model_id,
    upload_metrics,
    upload_model,
    upload_update,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Bytes sent per write of the slow upload, and the pause between writes.
SLOW_CHUNK_BYTES = 256 * 1024
SLOW_CHUNK_PAUSE_SECONDS = 0.01
# A worker logs this line each time it connects to the broker.
BROKER_CONNECTED = re.compile(r"Connected to redis://")


class LargeNet(torch.nn.Module):
    """About 64 MB of float32 weights, so that an upload takes many writes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4000, 4000)
        self.fc2 = torch.nn.Linear(4000, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


# Helpers


def files_under(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def model_rows(data_dir: Path) -> set[tuple[str, str, str]]:
    """Return (id, kind, weights_path) of every Model row in the embedded SQLite database."""
    with contextlib.closing(sqlite3.connect(data_dir / "fedserve.sqlite3")) as database:
        rows = database.execute("SELECT id, kind, weights_path FROM core_model").fetchall()
    return {(str(row[0]), str(row[1]), str(row[2])) for row in rows}


def multipart_update(round_number: int, sample_size: int, payload: bytes) -> tuple[bytes, bytes]:
    """Return (content type, body) of a multipart/form-data update form."""
    boundary = b"fedserve-faults-boundary"
    head = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="round"\r\n\r\n'
        + str(round_number).encode()
        + b"\r\n--"
        + boundary
        + b"\r\n"
        b'Content-Disposition: form-data; name="sample_size"\r\n\r\n'
        + str(sample_size).encode()
        + b"\r\n--"
        + boundary
        + b"\r\n"
        b'Content-Disposition: form-data; name="model_file"; filename="update.pt"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    tail = b"\r\n--" + boundary + b"--\r\n"
    return b"multipart/form-data; boundary=" + boundary, head + payload + tail


class SlowUpload:
    """An update upload over a raw socket that declares its full length and sends it slowly."""

    def __init__(self, url: str, participant: Account, model_id: str, body: bytes, kind: bytes):
        port = int(url.rsplit(":", 1)[1])
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.body = body
        self.sent = 0
        header = (
            (
                f"POST /api/models/{model_id}/ HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\n"
                f"Authorization: {participant.headers['Authorization']}\r\n"
                f"Content-Length: {len(body)}\r\n"
            ).encode()
            + b"Content-Type: "
            + kind
            + b"\r\n\r\n"
        )
        self.connection.sendall(header)

    def send_until(self, byte_count: int) -> None:
        while self.sent < byte_count:
            chunk = self.body[self.sent : self.sent + SLOW_CHUNK_BYTES]
            self.connection.sendall(chunk)
            self.sent += len(chunk)
            time.sleep(SLOW_CHUNK_PAUSE_SECONDS)

    def close(self) -> None:
        self.connection.close()


def wait_for_spool(tmp_dir: Path, known: set[str], min_bytes: int) -> set[str]:
    """Wait until a new spool file in `tmp_dir` has at least `min_bytes`; return new names."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = files_under(tmp_dir) - known
        if any((tmp_dir / name).stat().st_size >= min_bytes for name in new):
            return new
        time.sleep(0.05)
    raise AssertionError(f"no spool file of {min_bytes} bytes appeared in {tmp_dir}")


# Server killed during an upload


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "data")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_server_killed_during_update_upload(embedded: Cluster) -> None:
    url = embedded.urls[0]
    data_dir = embedded.data_dir
    actor = Account(url, "faults-actor", actor=True)
    participants = [Account(url, f"faults-participant-{i}", client=True) for i in range(2)]
    feeds = [Feed(participant) for participant in participants]
    torch.manual_seed(0)
    model_id = upload_model(url, actor, LargeNet())
    training_id = create_training(url, actor, model_id, participants, target_num_updates=1)
    model_id = training_model_id(url, actor, training_id)
    start_training(url, actor, training_id)
    for feed in feeds:
        feed.wait_for(url, "UPDATE_ROUND_START", round=0)
    base = download_state(url, participants[0], model_id)
    updates = [{key: value + offset for key, value in base.items()} for offset in (1.0, 3.0)]

    response = upload_update(url, participants[0], model_id, 0, updates[0], 10)
    assert response.status_code == 201, response.text

    rows_before = model_rows(data_dir)
    stored_before = files_under(data_dir / "models")
    spool_before = files_under(data_dir / "tmp")
    payload = state_dict_bytes(updates[1])
    kind, body = multipart_update(0, 30, payload)
    assert len(body) > 60_000_000

    # A quarter of the body is on its way when the server dies.
    upload = SlowUpload(url, participants[1], model_id, body, kind)
    try:
        upload.send_until(len(body) // 4)
        spool_at_kill = wait_for_spool(data_dir / "tmp", spool_before, 8 * 1024 * 1024)
        embedded.kill()
    finally:
        upload.close()
    # The killed upload left its spool file. A restart removes spool files that have not
    # changed for FEDSERVE_SPOOL_MAX_AGE_SECONDS, so age this one past the default.
    assert files_under(data_dir / "tmp") - spool_before == spool_at_kill
    stale = time.time() - 7 * 3600
    for name in spool_at_kill:
        os.utime(data_dir / "tmp" / name, (stale, stale))
    embedded.start()

    assert model_rows(data_dir) == rows_before
    assert files_under(data_dir / "models") == stored_before
    assert files_under(data_dir / "tmp") - spool_before == set()

    # The round still waits for participant 1, whose retry of the same upload counts.
    retry = requests.post(
        f"{url}/api/models/{model_id}/",
        headers={**participants[1].headers, "Content-Type": kind.decode()},
        data=body,
        timeout=120,
    )
    assert retry.status_code == 201, retry.text
    for feed in feeds:
        feed.wait_for(url, "MODEL_TEST_ROUND", round=1, timeout=90)
    aggregated = download_state(url, participants[0], model_id)
    for key, value in aggregated.items():
        # Sample sizes 10 and 30: the weighted mean of the offsets 1 and 3 is 2.5.
        assert torch.allclose(value, base[key] + 2.5, atol=1e-4), key
    assert embedded.aggregations(training_id) == 1

    for i, participant in enumerate(participants):
        upload_metrics(url, participant, model_id, 0.5 + i / 10)
    for feed in feeds:
        feed.wait_for(url, "TRAINING_FINISHED")
        feed.pull(url, wait=0)
        assert feed.count("UPDATE_ROUND_START", round=0) == 1
        assert feed.count("MODEL_TEST_ROUND", round=1) == 1
        assert feed.count("TRAINING_FINISHED") == 1


# Broker restarted during a training


class RedisServer:
    """A redis-server of this test alone on 127.0.0.1, without persistence.

    It is killed with SIGKILL and started again empty, so every message that was queued
    in it is lost, as on a broker crash without persistence.
    """

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"redis-server did not listen on port {self.port}:\n{self.log.read_text()}"
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def kill_pubsub_first(self) -> None:
        """Kill the server so that every client loses its pub/sub connection first.

        The server rejects new clients, closes its pub/sub connections and is frozen with
        SIGSTOP before SIGKILL closes the other connections, so no client gets a reply or
        reconnects in between. A Celery 5.7.0 worker that held an unacknowledged task exited
        on this order every time; after a plain SIGKILL it exited in some runs only.
        """
        import redis

        assert self.process is not None
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            client.config_set("maxclients", 1)
            client.client_kill_filter(_type="pubsub")
            self.process.send_signal(signal.SIGSTOP)
        finally:
            client.close()
        self.kill()


def wait_for_broker_connections(worker: FedserveProcess, count: int, timeout: float = 60) -> None:
    """Wait until `worker` has logged `count` broker connections, and fail if it exits first.

    Celery 5.7.0 workers exited with "Unrecoverable error: AttributeError" instead of
    reconnecting when the broker connection dropped during an unacknowledged task.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_alive()
        if len(BROKER_CONNECTED.findall(worker.log.read_text(errors="replace"))) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(
        f"{worker.name} did not connect to the broker {count} times within {timeout} s:\n"
        f"{worker.log.read_text(errors='replace')[-3000:]}"
    )


class HoldingReceiver(Receiver):
    """A webhook endpoint on 127.0.0.1 that delays its first response until `release`.

    Until then, the worker that posted the request runs its delivery task unacknowledged.
    """

    def __init__(self) -> None:
        self.first_arrived = threading.Event()
        self.released = threading.Event()
        super().__init__()

    def before_accepting(self, message: dict[str, Any]) -> None:
        if not self.first_arrived.is_set():
            self.first_arrived.set()
            self.released.wait(120)

    def release(self) -> None:
        self.released.set()

    def wait_for(self, notification_type: str, timeout: float = 60, **body: Any) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(notification_type, **body):
                return
            time.sleep(0.1)
        raise AssertionError(
            f"no {notification_type} {body} posted within {timeout} s; received "
            f"{[(m['notification_type'], m['body']) for m in self.received]}"
        )

    def close(self) -> None:
        self.release()
        super().close()


@pytest.fixture
def production(tmp_path: Path) -> Iterator[tuple[Cluster, RedisServer]]:
    if not POSTGRES_URL:
        pytest.skip("the broker restart test needs PostgreSQL: set FEDSERVE_TEST_POSTGRES")
    broker = RedisServer(tmp_path / "redis.log")
    broker.start()
    try:
        with fresh_postgres_database() as database_url:
            cluster = Cluster(
                tmp_path / "data",
                workers=1,
                database_url=database_url,
                broker_url=broker.url,
                queue_name="fedserve-faults",
            )
            cluster.migrate()
            cluster.start()
            try:
                yield cluster, broker
            finally:
                cluster.stop()
    finally:
        broker.kill()


@pytest.mark.postgres
def test_broker_restart_during_training(production: tuple[Cluster, RedisServer]) -> None:
    cluster, broker = production
    url = cluster.urls[0]
    actor = Account(url, "broker-actor", actor=True)
    participants = [Account(url, f"broker-participant-{i}", client=True) for i in range(3)]
    feeds = [Feed(participant) for participant in participants]
    torch.manual_seed(2)
    model_id = upload_model(url, actor, SmallNet())
    training_id = create_training(url, actor, model_id, participants, target_num_updates=2)
    model_id = training_model_id(url, actor, training_id)
    start_training(url, actor, training_id)
    for feed in feeds:
        feed.wait_for(url, "UPDATE_ROUND_START", round=0)
    base = download_state(url, participants[0], model_id)

    def send_update(i: int, round_number: int, state: dict[str, torch.Tensor]) -> None:
        update = {key: value + (i + 1) for key, value in state.items()}
        response = upload_update(url, participants[i], model_id, round_number, update, 10)
        assert response.status_code == 201, response.text

    send_update(0, 0, base)
    send_update(1, 0, base)

    # The last update of round 0 arrives while the broker is down, so the round switch it
    # schedules cannot be queued. The broker then starts again, empty.
    broker.kill()
    send_update(2, 0, base)
    broker.start()
    wait_for_broker_connections(cluster.workers[0], 2)

    for feed in feeds:
        feed.wait_for(url, "MODEL_TEST_ROUND", round=1, timeout=60)
    after_round_0 = download_state(url, participants[0], model_id)
    for key, value in after_round_0.items():
        assert torch.allclose(value, base[key] + 2.0, atol=1e-5), key
    for i, participant in enumerate(participants):
        upload_metrics(url, participant, model_id, 0.5 + i / 10)

    # Round 1 with a broker restart between two uploads.
    for feed in feeds:
        feed.wait_for(url, "UPDATE_ROUND_START", round=1)
    send_update(0, 1, after_round_0)
    broker.kill()
    broker.start()
    wait_for_broker_connections(cluster.workers[0], 3)
    send_update(1, 1, after_round_0)
    send_update(2, 1, after_round_0)
    for feed in feeds:
        feed.wait_for(url, "MODEL_TEST_ROUND", round=2, timeout=60)
    for i, participant in enumerate(participants):
        upload_metrics(url, participant, model_id, 0.6 + i / 10)

    for feed in feeds:
        feed.wait_for(url, "TRAINING_FINISHED", timeout=60)
    training = requests.get(
        f"{url}/api/trainings/{training_id}/", headers=actor.headers, timeout=30
    ).json()
    assert training["state"] == "C"
    assert cluster.aggregations(training_id) == 2
    for feed in feeds:
        feed.pull(url, wait=0)
        assert feed.count("TRAINING_START") == 1
        assert feed.count("UPDATE_ROUND_START", round=0) == 1
        assert feed.count("MODEL_TEST_ROUND", round=1) == 1
        assert feed.count("UPDATE_ROUND_START", round=1) == 1
        assert feed.count("MODEL_TEST_ROUND", round=2) == 1
        assert feed.count("TRAINING_FINISHED") == 1
        assert len(feed.seen) == 6


@pytest.mark.postgres
def test_worker_survives_broker_restart_holding_task(
    production: tuple[Cluster, RedisServer],
) -> None:
    cluster, broker = production
    url = cluster.urls[0]
    worker = cluster.workers[0]
    assert worker.process is not None
    worker_pid = worker.process.pid
    receiver = HoldingReceiver()
    try:
        actor = Account(url, "holding-actor", actor=True)
        participant = Account(
            url, "holding-participant", client=True, message_endpoint=receiver.url
        )
        torch.manual_seed(3)
        model_id = upload_model(url, actor, SmallNet())
        training_id = create_training(url, actor, model_id, [participant])
        model_id = training_model_id(url, actor, training_id)
        start_training(url, actor, training_id)

        # The worker posts TRAINING_START and waits for the response, so its delivery task
        # runs unacknowledged while the broker dies and starts again empty.
        assert receiver.first_arrived.wait(60), "the worker posted no notification"
        broker.kill_pubsub_first()
        broker.start()
        wait_for_broker_connections(worker, 2)
        receiver.release()
        receiver.wait_for("UPDATE_ROUND_START", round=0)

        # The round switch after the update is a task queued on the new broker.
        base = download_state(url, participant, model_id)
        update = {key: value + 1.0 for key, value in base.items()}
        response = upload_update(url, participant, model_id, 0, update, 10)
        assert response.status_code == 201, response.text
        receiver.wait_for("MODEL_TEST_ROUND", round=1)

        worker.check_alive()
        assert worker.process.pid == worker_pid
        assert cluster.aggregations(training_id) == 1
        assert receiver.count("TRAINING_START") == 1
        assert receiver.count("UPDATE_ROUND_START", round=0) == 1
        assert receiver.count("MODEL_TEST_ROUND", round=1) == 1
    finally:
        receiver.close()
