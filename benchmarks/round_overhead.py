"""Measure round overhead: from the last upload of a round to the last next-round webhook.

Starts `fedserve serve` on the embedded default (SQLite, in-process background work) in a
fresh data directory and one webhook receiver on 127.0.0.1 that serves every participant
under its own path. For each scenario it runs trainings with `skip_model_tests`, so that
the notification after an aggregation is the next UPDATE_ROUND_START. All but one
participant upload their update. The clock starts when the server has responded 201 to
the last upload and stops when the receiver has accepted the next round's notification
for every participant. That span covers the round check, the aggregation, storing the new
global model, the switch transaction and the webhook deliveries.

    .venv/bin/python -m benchmarks.round_overhead [--scenarios 10x10M,100xsmall] [--runs 3]
        [--data-dir DIR]

FEDSERVE_LOG_LEVEL=INFO makes server.log show when each step of a round ended.

Run it as a module from the repository root: run as a script, `benchmarks/requests.py`
would shadow the requests package.

A scenario is PARTICIPANTSxMODEL with MODEL one of `small` (a 4-8-3 network, 67
parameters) or `10M` (two linear layers, 10.0M float32 parameters, 40 MB).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import torch


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TenMillionNet(torch.nn.Module):
    """Two 2236-by-2236 linear layers with biases: 10.0M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2236, 2236)
        self.fc2 = torch.nn.Linear(2236, 2236)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"small": SmallNet, "10M": TenMillionNet}


class Receiver:
    """Webhook endpoints `/<participant index>`: records when each notification arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[int, str, tuple[str, Any]], float] = {}
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                message = json.loads(self.rfile.read(length))
                now = time.perf_counter()
                key = (
                    int(self.path.strip("/")),
                    message["training_uuid"],
                    (message["notification_type"], message["body"].get("round")),
                )
                with receiver.changed:
                    receiver.arrivals[key] = now
                    receiver.changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_all(
        self, participants: int, training_id: str, event: tuple[str, int], timeout: float = 300
    ) -> float:
        """Wait until every participant received `event`; return the last arrival time."""
        deadline = time.monotonic() + timeout
        keys = [(i, training_id, event) for i in range(participants)]
        with self.changed:
            while not all(key in self.arrivals for key in keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sum(1 for key in keys if key not in self.arrivals)
                    raise TimeoutError(f"{missing} participants did not receive {event}")
                self.changed.wait(remaining)
            return max(self.arrivals[key] for key in keys)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "FEDSERVE_PRODUCTION"}
    }
    env.update(
        {
            "FEDSERVE_DATA_DIR": str(data_dir),
            "FEDSERVE_LOG_LEVEL": os.environ.get("FEDSERVE_LOG_LEVEL", "WARNING"),
        }
    )
    log = (data_dir / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fedserve", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fedserve serve exited; see {data_dir / 'server.log'}")
        try:
            requests.get(f"{url}/api/schema/", timeout=2)
            return process, url
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"fedserve serve did not start; see {data_dir / 'server.log'}")


def register(url: str, name: str, **fields: Any) -> dict[str, Any]:
    response = requests.post(
        f"{url}/api/users/",
        json={"username": name, "password": f"{name}-password-1", **fields},
        timeout=30,
    )
    response.raise_for_status()
    user: dict[str, Any] = response.json()
    return user


def headers(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Token {user['token']}"}


def run_scenario(
    url: str, receiver: Receiver, participants: int, model_name: str, runs: int, tag: str
) -> list[float]:
    """Run `runs` trainings of one round each; return the overhead of each in seconds."""
    actor = register(url, f"actor-{tag}", actor=True)
    users = [
        register(url, f"p{i}-{tag}", client=True, message_endpoint=f"{receiver.url}/{i}")
        for i in range(participants)
    ]
    # Every participant shares the receiver, so endpoints map back to indexes by path.
    torch.manual_seed(0)
    module = MODELS[model_name]()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    model_bytes = buffer.getvalue()
    update = io.BytesIO()
    torch.save({key: value + 0.01 for key, value in module.state_dict().items()}, update)
    update_bytes = update.getvalue()

    overheads = []
    for run in range(runs):
        response = requests.post(
            f"{url}/api/models/",
            headers=headers(actor),
            data={"name": f"{model_name} {run}", "description": "round overhead benchmark"},
            files={"model_file": ("model.pt", model_bytes, "application/octet-stream")},
            timeout=300,
        )
        response.raise_for_status()
        model_id = response.json()["model_id"]
        response = requests.post(
            f"{url}/api/trainings/",
            headers=headers(actor),
            json={
                "model_id": model_id,
                "target_num_updates": 2,
                "metric_names": [],
                "aggregation_method": "FedAvg",
                "clients": [user["id"] for user in users],
                "options": {"skip_model_tests": True},
            },
            timeout=60,
        )
        response.raise_for_status()
        training_id = response.json()["training_id"]
        requests.post(
            f"{url}/api/trainings/{training_id}/start/", headers=headers(actor), timeout=60
        ).raise_for_status()
        receiver.wait_all(participants, training_id, ("UPDATE_ROUND_START", 0))

        def upload(user: dict[str, Any], model_id: str = model_id) -> None:
            requests.post(
                f"{url}/api/models/{model_id}/",
                headers=headers(user),
                data={"round": 0, "sample_size": 10},
                files={"model_file": ("update.pt", update_bytes, "application/octet-stream")},
                timeout=300,
            ).raise_for_status()

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(upload, users[:-1]))
        upload(users[-1])
        uploaded = time.perf_counter()
        delivered = receiver.wait_all(participants, training_id, ("UPDATE_ROUND_START", 1))
        overheads.append(delivered - uploaded)
        print(
            f"  {participants} participants, {model_name} model, run {run + 1}: "
            f"{delivered - uploaded:.3f} s",
            flush=True,
        )
    return overheads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="10x10M,100xsmall")
    parser.add_argument("--runs", type=int, default=3, help="trainings per scenario")
    parser.add_argument(
        "--data-dir",
        help="keep the server's data directory and server.log here instead of a temporary one",
    )
    args = parser.parse_args()

    receiver = Receiver()
    with tempfile.TemporaryDirectory(prefix="fedserve-round-overhead-") as folder:
        data_dir = Path(args.data_dir or folder)
        data_dir.mkdir(parents=True, exist_ok=True)
        process, url = start_server(data_dir)
        try:
            results = []
            for index, scenario in enumerate(args.scenarios.split(",")):
                count, model_name = scenario.split("x", 1)
                overheads = run_scenario(
                    url, receiver, int(count), model_name, args.runs, tag=str(index)
                )
                results.append((int(count), model_name, overheads))
        finally:
            process.terminate()
            process.wait(30)

    print("\n| participants | model | runs | median s | max s |")
    print("|---|---|---|---|---|")
    for count, model_name, overheads in results:
        print(
            f"| {count} | {model_name} | {len(overheads)} | "
            f"{statistics.median(overheads):.3f} | {max(overheads):.3f} |"
        )


if __name__ == "__main__":
    main()
