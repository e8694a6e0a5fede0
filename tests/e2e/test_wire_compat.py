"""A participant that speaks only the wire format goes through a whole training.

Nothing here uses fedserve.client: requests, TorchScript files and a plain webhook
receiver stand in for a participant written against the HTTP contract alone, such as
the clients of the Federated Learning Demonstrator.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.client.server import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROUNDS = 2
SAMPLE_SIZES = [30, 10]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.dropout = torch.nn.Dropout(0.25)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


def torchscript(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(
        torch.jit.script(module) if not isinstance(module, torch.jit.ScriptModule) else module,
        buffer,
    )
    return buffer.getvalue()


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records every notification in order."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.received.append(body)
                outer.inbox.put(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(Path(tmp_path_factory.mktemp("wire-server"))) as url:
        yield url


def register(url: str, name: str, **fields: Any) -> dict[str, Any]:
    response = requests.post(
        f"{url}/api/users/",
        json={"username": name, "password": f"{name}-password-1", **fields},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


def run_participant(
    url: str,
    user: dict[str, Any],
    receiver: Receiver,
    sample_size: int,
    offset: float,
    uploads: dict[int, dict[str, torch.Tensor]],
    errors: list[BaseException],
) -> None:
    """React to webhooks: train (add `offset` to every weight), upload, report metrics."""
    # Basic authentication with the token as username and an empty password.
    auth = (user["token"], "")
    try:
        while True:
            message = receiver.inbox.get(timeout=60)
            kind = message["notification_type"]
            body = message["body"]
            if kind == "TRAINING_FINISHED":
                return
            if kind == "UPDATE_ROUND_START":
                download = requests.get(
                    f"{url}/api/models/{body['global_model_uuid']}/", auth=auth, timeout=30
                )
                download.raise_for_status()
                model = torch.jit.load(io.BytesIO(download.content))
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.add_(offset)
                uploads[body["round"]] = {k: v.clone() for k, v in model.state_dict().items()}
                response = requests.post(
                    f"{url}/api/models/{body['global_model_uuid']}/",
                    auth=auth,
                    data={
                        "round": body["round"],
                        "sample_size": sample_size,
                        "metric_names": ["train_loss"],
                        "metric_values": [0.5],
                    },
                    files={
                        "model_file": ("update.pt", torchscript(model), "application/octet-stream")
                    },
                    timeout=30,
                )
                assert response.status_code == 201, response.text
                assert response.json()["detail"] == "Model Update Accepted"
            elif kind == "MODEL_TEST_ROUND":
                response = requests.post(
                    f"{url}/api/models/{body['global_model_uuid']}/metrics/",
                    auth=auth,
                    data={"metric_names": ["accuracy"], "metric_values": [0.5 + offset]},
                    timeout=30,
                )
                assert response.status_code == 201, response.text
    except BaseException as exc:  # The test thread asserts that none happened.
        errors.append(exc)


def test_wire_only_participants_complete_training(server_url: str) -> None:
    url = server_url
    actor = register(url, "wire-actor", actor=True, client=False)
    actor_headers = {"Authorization": f"Token {actor['token']}"}
    receivers = [Receiver(), Receiver()]
    participants = [
        register(url, f"wire-participant-{i}", client=True, message_endpoint=receivers[i].url)
        for i in range(2)
    ]

    torch.manual_seed(0)
    initial = torch.jit.script(Net())
    upload = requests.post(
        f"{url}/api/models/",
        headers=actor_headers,
        data={"name": "wire-net", "description": "4-6-3 net", "input_shape": ["None", "4"]},
        files={"model_file": ("net.pt", torchscript(initial), "application/octet-stream")},
        timeout=30,
    )
    assert upload.status_code == 201, upload.text
    model_id = upload.json()["model_id"]

    created = requests.post(
        f"{url}/api/trainings/",
        headers=actor_headers,
        json={
            "model_id": model_id,
            "target_num_updates": ROUNDS,
            "metric_names": ["accuracy"],
            "aggregation_method": "FedAvg",
            "clients": [p["id"] for p in participants],
        },
        timeout=30,
    )
    assert created.status_code == 201, created.text
    training_id = created.json()["training_id"]

    uploads: list[dict[int, dict[str, torch.Tensor]]] = [{}, {}]
    errors: list[BaseException] = []
    offsets = [0.01, -0.03]
    threads = [
        threading.Thread(
            target=run_participant,
            args=(
                url,
                participants[i],
                receivers[i],
                SAMPLE_SIZES[i],
                offsets[i],
                uploads[i],
                errors,
            ),
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    started = requests.post(
        f"{url}/api/trainings/{training_id}/start/", headers=actor_headers, timeout=30
    )
    assert started.status_code == 202, started.text
    for thread in threads:
        thread.join(90)
    for receiver in receivers:
        receiver.close()
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)

    # The training completed, and the notifications followed the round life cycle.
    training = requests.get(
        f"{url}/api/trainings/{training_id}/", headers=actor_headers, timeout=30
    ).json()
    assert training["state"] == "C"
    kinds = [(m["notification_type"], m["body"].get("round")) for m in receivers[0].received]
    assert kinds == [
        ("TRAINING_START", None),
        ("UPDATE_ROUND_START", 0),
        ("MODEL_TEST_ROUND", 1),
        ("UPDATE_ROUND_START", 1),
        ("MODEL_TEST_ROUND", 2),
        ("TRAINING_FINISHED", None),
    ]
    assert all(m["training_uuid"] == training_id for m in receivers[0].received)
    assert receivers[1].received == receivers[0].received

    # The final global model is the sample-size weighted mean of the last round's updates.
    metadata = requests.get(
        f"{url}/api/models/{model_id}/metadata/", headers=actor_headers, timeout=30
    ).json()
    assert metadata["round"] == ROUNDS
    final = torch.jit.load(
        io.BytesIO(
            requests.get(f"{url}/api/models/{model_id}/", headers=actor_headers, timeout=30).content
        )
    )
    total = sum(SAMPLE_SIZES)
    for name, value in final.state_dict().items():
        expected = sum(uploads[i][ROUNDS - 1][name] * SAMPLE_SIZES[i] / total for i in range(2))
        assert torch.allclose(value, expected, atol=1e-6), name

    # Test metrics of both participants are stored under each round.
    metrics = requests.get(
        f"{url}/api/models/{model_id}/metrics/", headers=actor_headers, timeout=30
    ).json()
    accuracy_steps = sorted(
        m["step"] for m in metrics if "accuracy" in (m.get("key"), m.get("identifier"))
    )
    assert accuracy_steps == [1, 1, 2, 2]
