"""Benchmark POST /api/inference/ against the same forward passes run directly in torch.

The script creates a fresh data directory, stores an MLP of about 1.07 million
parameters (784-1024-256-10 with dropout) as a TorchScript model with an MC_DROPOUT
training, and starts `fedserve serve` on 127.0.0.1 in a subprocess. Each client thread
then repeats a cycle for a fixed time. The cycle runs the N forward passes (dropout
active) directly in torch in this process, with the same number of torch threads as the
server. Then it sends one request with the batch as JSON and one with the batch as a
torch.save file. The script prints requests per second and latencies for each, and the
server's overhead over direct torch.

    .venv/bin/python -m benchmarks.inference
    .venv/bin/python -m benchmarks.inference --concurrency 2

Run it as a module from the repository root: run as a file, the folder's own
requests.py would shadow the requests package.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

INPUT_FEATURES = 784
CLASSES = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20, help="MC dropout passes (N)")
    parser.add_argument("--batch", type=int, default=64, help="rows per request")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to measure")
    parser.add_argument("--concurrency", type=int, default=1, help="parallel client threads")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads per request, in the server and the direct run",
    )
    parser.add_argument(
        "--server-threads", type=int, default=8, help="gunicorn threads of the server"
    )
    parser.add_argument(
        "--input",
        choices=("json", "tensor", "both"),
        default="both",
        help="send the batch as a JSON list, as a torch.save file (multipart), or both",
    )
    return parser.parse_args()


def make_mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(INPUT_FEATURES, 1024),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 256),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(256, CLASSES),
    )


def set_up_data(samples: int) -> tuple[str, str, bytes]:
    """Create the database rows and model file; return (token, model id, TorchScript bytes)."""
    import django
    import torch

    django.setup()
    from django.core.files.base import ContentFile
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from fedserve import modelstore
    from fedserve.core.models import Model, Training, User

    call_command("migrate", interactive=False, verbosity=0)
    user = User.objects.create_user(username="bench", password="bench-password")
    token = Token.objects.create(user=user)

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(make_mlp()), buffer)
    archive = buffer.getvalue()
    model = Model.objects.create(
        owner=user, name="mlp", description="benchmark MLP", input_shape=[None, INPUT_FEATURES]
    )
    model.weights_path = modelstore.save(
        modelstore.model_file_path(model.pk, "weights.pt"), ContentFile(archive)
    )
    model.weights_format = "torchscript"
    model.weights_size = len(archive)
    model.save()
    Training.objects.create(
        model=model,
        actor=user,
        target_num_updates=1,
        aggregation_method="FedAvg",
        uncertainty_method="MC_DROPOUT",
        options={"uncertainty": {"N": samples}},
    )
    return token.key, str(model.pk), archive


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], port: int, threads: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "fedserve",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"fedserve serve exited with code {server.returncode}")
            try:
                # Any HTTP status (401 here) shows that the server is up.
                requests.get(f"http://127.0.0.1:{port}/api/users/myself/", timeout=10)
                return server
            except requests.RequestException:
                time.sleep(0.2)
        raise SystemExit("fedserve serve did not respond within 60 s")
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def build_requests(model_id: str, batch: np.ndarray) -> dict[str, dict[str, Any]]:
    """Return request keyword arguments per input kind, built once outside the timing."""
    import json

    import torch

    json_body = json.dumps(
        {"model_id": model_id, "model_input": batch.astype(np.float64).round(4).tolist()}
    ).encode()
    tensor_file = io.BytesIO()
    torch.save(torch.from_numpy(batch), tensor_file)
    return {
        "json": {"data": json_body, "headers": {"Content-Type": "application/json"}},
        "tensor": {
            "data": {"model_id": model_id},
            "files": {"model_input": ("input.pt", tensor_file.getvalue())},
        },
    }


def check_answers(
    url: str, token: str, request_kwargs: dict[str, dict[str, Any]], batch: int
) -> None:
    """Send one request of each kind, which also loads the model into the server's cache."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    for kind, kwargs in request_kwargs.items():
        response = session.post(url, timeout=60, **kwargs)
        if response.status_code != 200:
            raise SystemExit(f"{kind} request failed: {response.status_code} {response.text}")
        body = response.json()
        assert len(body["inference"]) == batch, kind
        assert set(body["uncertainty"]) >= {"variance", "std"}, kind


def measure_interleaved(
    url: str,
    token: str,
    request_kwargs: dict[str, dict[str, Any]],
    archive: bytes,
    batch: np.ndarray,
    samples: int,
    duration: float,
    concurrency: int,
) -> dict[str, list[float]]:
    """Return latencies in seconds per kind ("direct" and each input kind).

    Each client thread repeats a cycle of one direct run (`samples` forward passes with
    dropout active, on its own module copy) and one request per input kind. Direct and
    server calls so take turns within a cycle, and load from other processes on the
    machine affects both alike.
    """
    import torch

    from fedserve.uncertainty import mc_dropout

    model_input = torch.from_numpy(batch)
    latencies: dict[str, list[float]] = {"direct": [], **{kind: [] for kind in request_kwargs}}
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client() -> None:
        module = torch.jit.load(io.BytesIO(archive))
        module.eval()
        for layer in mc_dropout.dropout_layers(module):
            layer.train(True)
        session = requests.Session()
        session.headers["Authorization"] = f"Token {token}"
        own: dict[str, list[float]] = {kind: [] for kind in latencies}
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            with torch.inference_mode():
                for _ in range(samples):
                    module(model_input)
            own["direct"].append(time.perf_counter() - started)
            for kind, kwargs in request_kwargs.items():
                started = time.perf_counter()
                response = session.post(url, timeout=60, **kwargs)
                own[kind].append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
                    return
        with lock:
            for kind, values in own.items():
                latencies[kind].extend(values)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"inference request failed: {failures[0]}")
    return latencies


def main() -> None:
    args = parse_args()
    data_dir = tempfile.mkdtemp(prefix="fedserve-bench-inference-")
    env = {
        **os.environ,
        "FEDSERVE_DATA_DIR": data_dir,
        "FEDSERVE_TORCH_THREADS": str(args.torch_threads),
        "FEDSERVE_LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "fedserve.settings",
    }
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    os.environ.update({key: env[key] for key in ("FEDSERVE_DATA_DIR", "DJANGO_SETTINGS_MODULE")})
    os.environ.pop("DATABASE_URL", None)

    import torch

    torch.set_num_threads(args.torch_threads)
    token, model_id, archive = set_up_data(args.samples)
    batch = np.random.default_rng(0).random((args.batch, INPUT_FEATURES), dtype=np.float32)
    batch = batch.round(4)
    kinds = ["json", "tensor"] if args.input == "both" else [args.input]
    request_kwargs = build_requests(model_id, batch)

    port = free_port()
    url = f"http://127.0.0.1:{port}/api/inference/"
    server = start_server(env, port, args.server_threads)
    try:
        print(
            f"MLP {sum(p.numel() for p in make_mlp().parameters()):,} parameters, batch "
            f"{args.batch}, MC dropout N={args.samples}, {args.duration:.0f} s, "
            f"concurrency {args.concurrency}, torch "
            f"threads {args.torch_threads}, server threads {args.server_threads}, CPUs "
            f"{os.cpu_count()}"
        )
        check_answers(url, token, request_kwargs, args.batch)
        latencies = measure_interleaved(
            url,
            token,
            {kind: request_kwargs[kind] for kind in kinds},
            archive,
            batch,
            args.samples,
            args.duration,
            args.concurrency,
        )

        direct_median = statistics.median(latencies["direct"])
        direct_mean = statistics.mean(latencies["direct"])
        for kind, values in latencies.items():
            label = "direct torch" if kind == "direct" else f"server, {kind} input"
            median = statistics.median(values)
            mean = statistics.mean(values)
            # Requests per second that `concurrency` clients doing only this would reach.
            rate = args.concurrency / mean
            line = (
                f"{label:<22} {rate:6.2f} req/s  latency median {median * 1000:6.1f} ms, "
                f"mean {mean * 1000:6.1f} ms ({len(values)} calls)"
            )
            if kind != "direct":
                line += (
                    f"  overhead: median {median / direct_median - 1:6.1%}, "
                    f"mean {mean / direct_mean - 1:6.1%}"
                )
            print(line)
    finally:
        stop_server(server)
        Path(data_dir, "fedserve.sqlite3").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
