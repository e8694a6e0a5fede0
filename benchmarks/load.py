"""Load scenarios against a real `fedserve serve`: many participants, and memory over rounds.

Each scenario creates a fresh FEDSERVE_DATA_DIR in a temporary directory and creates the
users and their tokens directly in the database. It then starts `fedserve serve` on
127.0.0.1 in a subprocess (embedded default: SQLite, local model folder, in-process
worker), drives it over HTTP only, and stops it at the end.

`participants`: N participants (threads in a few worker processes) follow one FedAvg
training of a small TorchScript MLP with model tests off. Each pulls its notifications
with long polling, downloads the global model each round and uploads a perturbed state
dict. Meanwhile inference callers (threads in one more process) post inference requests
on another model of the actor in a loop until the training ends. The script prints the
total time, every non-2xx response and exception, and p50/p99 latencies per request kind.

`memory`: R rounds of a TorchScript MLP of about 100 MB with 3 participant threads and
model tests off. After each aggregation the script prints the RSS of the server process
and its children (psutil), and the growth from round 1 to the last round.

    .venv/bin/python -m benchmarks.load participants
    .venv/bin/python -m benchmarks.load memory

Run it as a module from the repository root: run as a file, the folder's own
requests.py would shadow the requests package.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

POLL_WAIT_SECONDS = 20.0
REQUEST_TIMEOUT_SECONDS = 120.0
CONNECTION_ATTEMPTS = 3


# --- results ----------------------------------------------------------------------------


@dataclass
class Results:
    """Latencies in seconds per request kind, and one line per failed request."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def export(self) -> tuple[dict[str, list[float]], list[str]]:
        with self.lock:
            return dict(self.latencies), list(self.errors)


def timed_request(
    session: requests.Session,
    results: Results,
    kind: str,
    method: str,
    url: str,
    **kwargs: Any,
) -> requests.Response | None:
    """Send one request; record its latency, or record it as an error and return None.

    A connection error (no HTTP response at all) is recorded as an error and the request
    is sent again, up to CONNECTION_ATTEMPTS times in all, as the fedserve SDK does.
    Without that, a participant that loses its update would stall the round forever.
    """
    kwargs.setdefault("timeout", REQUEST_TIMEOUT_SECONDS)
    for attempt in range(1, CONNECTION_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            response = session.request(method, url, **kwargs)
        except requests.ConnectionError as error:
            message = f"{kind} {method} {url} (attempt {attempt}): {type(error).__name__}: {error}"
            print(message, file=sys.stderr, flush=True)
            results.fail(message)
            time.sleep(1)
            continue
        except requests.RequestException as error:
            results.fail(f"{kind} {method} {url}: {type(error).__name__}: {error}")
            return None
        elapsed = time.monotonic() - started
        if not 200 <= response.status_code < 300:
            message = f"{kind} {method} {url}: HTTP {response.status_code} {response.text[:300]}"
            print(message, file=sys.stderr, flush=True)
            results.fail(message)
            return None
        results.add(kind, elapsed)
        return response
    return None


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values` (fraction in 0..1)."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def print_latencies(latencies: dict[str, list[float]]) -> None:
    print(f"{'request':<14}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind in sorted(latencies):
        values = latencies[kind]
        if not values:
            continue
        print(
            f"{kind:<14}{len(values):>8}{percentile(values, 0.5) * 1000:>10.1f}"
            f"{percentile(values, 0.99) * 1000:>10.1f}{max(values) * 1000:>10.1f}"
        )


def print_errors(errors: list[str]) -> None:
    print(f"errors (non-2xx responses and exceptions): {len(errors)}")
    for line in errors[:50]:
        print(f"  {line}")
    if len(errors) > 50:
        print(f"  ... and {len(errors) - 50} more")


# --- server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_environment(data_dir: Path, threads: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"}
    }
    env.update(
        {
            "FEDSERVE_DATA_DIR": str(data_dir),
            "FEDSERVE_THREADS": str(threads),
            "DJANGO_SETTINGS_MODULE": "fedserve.settings",
            "FEDSERVE_LOG_LEVEL": os.environ.get("FEDSERVE_LOG_LEVEL", "WARNING"),
        }
    )
    return env


def create_users(env: dict[str, str], participants: int) -> tuple[str, list[tuple[str, str]]]:
    """Migrate the fresh database and create the actor and participants.

    Returns the actor's token and (user id, token) per participant. The users get no
    usable password, which skips the password hashing that HTTP registration would
    spend per user. Every later step goes over HTTP.
    """
    os.environ.update({key: env[key] for key in ("FEDSERVE_DATA_DIR", "DJANGO_SETTINGS_MODULE")})
    os.environ.pop("DATABASE_URL", None)
    import django

    django.setup()
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from fedserve.core.models import User

    call_command("migrate", interactive=False, verbosity=0)
    actor = User.objects.create_user(username="load-actor", password=None, actor=True)
    actor_token = Token.objects.get_or_create(user=actor)[0].key
    tokens = []
    for index in range(participants):
        user = User.objects.create_user(username=f"load-participant-{index}", password=None)
        tokens.append((str(user.pk), Token.objects.get_or_create(user=user)[0].key))
    from django.db import connections

    connections.close_all()
    return actor_token, tokens


def start_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start `fedserve serve` with its output (access log included) going to `log_path`."""
    command = [sys.executable, "-m", "fedserve", "serve", "--host", "127.0.0.1"]
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
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
    stop_server(server)
    raise SystemExit("fedserve serve did not respond within 60 s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def print_server_problems(log_path: Path) -> None:
    """Print the server log lines at level WARNING or above, and whole tracebacks."""
    markers = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    problems: list[str] = []
    in_traceback = False
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and not line.startswith(" "):
            # The first unindented line after a traceback is its exception message.
            problems.append(line)
            in_traceback = False
            continue
        if in_traceback or any(marker in line for marker in markers):
            problems.append(line)
    print(f"server log lines at WARNING or above, and tracebacks: {len(problems)}")
    for line in problems[:80]:
        print(f"  {line[:300]}")


def server_rss_bytes(pid: int) -> int:
    """Return the resident set size of the process and all its descendants."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


# --- models -----------------------------------------------------------------------------


def mlp(sizes: list[int]) -> Any:
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for index, (inputs, outputs) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(inputs, outputs))
        if index < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def torchscript_bytes(module: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def upload_global_model(base: str, token: str, name: str, archive: bytes, features: int) -> str:
    response = requests.post(
        f"{base}models/",
        headers={"Authorization": f"Token {token}"},
        data={"name": name, "description": "load benchmark", "input_shape": ["None", features]},
        files={"model_file": ("model.pt", archive, "application/octet-stream")},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    if response.status_code != 201:
        raise SystemExit(f"model upload failed: {response.status_code} {response.text}")
    return str(response.json()["model_id"])


def create_and_start_training(
    base: str, token: str, model_id: str, clients: list[str], rounds: int
) -> str:
    headers = {"Authorization": f"Token {token}"}
    response = requests.post(
        f"{base}trainings/",
        headers=headers,
        json={
            "model_id": model_id,
            "target_num_updates": rounds,
            "metric_names": [],
            "aggregation_method": "FedAvg",
            "options": {"skip_model_tests": True},
            "clients": clients,
        },
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    if response.status_code != 201:
        raise SystemExit(f"training creation failed: {response.status_code} {response.text}")
    return str(response.json()["training_id"])


def start_training(base: str, token: str, training_id: str) -> None:
    response = requests.post(
        f"{base}trainings/{training_id}/start/",
        headers={"Authorization": f"Token {token}"},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    if response.status_code != 202:
        raise SystemExit(f"training start failed: {response.status_code} {response.text}")


def perturbed_state_dict_file(model_bytes: bytes, seed: int) -> bytes:
    """Load a downloaded global model, add small noise to its weights, and torch.save them."""
    import torch

    buffer = io.BytesIO(model_bytes)
    try:
        state = torch.jit.load(buffer, map_location="cpu").state_dict()
    except RuntimeError:
        buffer.seek(0)
        state = torch.load(buffer, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    update = {
        key: value + 0.01 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        for key, value in state.items()
    }
    output = io.BytesIO()
    torch.save(update, output)
    return output.getvalue()


# --- participants -----------------------------------------------------------------------


def follow_training(
    base: str,
    token: str,
    training_id: str,
    model_id: str,
    seed: int,
    results: Results,
    deadline: float,
    on_notification: Callable[[str], None] | None = None,
) -> None:
    """Pull notifications with long polling and upload one perturbed update per round.

    `on_notification` is called with the type of each notification of the training.
    """
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    after = 0
    handled_rounds: set[int] = set()
    while time.monotonic() < deadline:
        response = timed_request(
            session,
            results,
            "poll",
            "GET",
            f"{base}users/myself/notifications/",
            params={"after": after, "wait": POLL_WAIT_SECONDS},
            timeout=REQUEST_TIMEOUT_SECONDS + POLL_WAIT_SECONDS,
        )
        if response is None:
            time.sleep(1)
            continue
        for item in response.json():
            after = max(after, int(item["seq"]))
            if item["training_uuid"] != training_id:
                continue
            kind = item["notification_type"]
            if on_notification is not None:
                on_notification(kind)
            if kind in {"TRAINING_FINISHED", "CLIENT_REMOVED"}:
                if kind == "CLIENT_REMOVED":
                    results.fail(f"participant {seed} was removed from the training")
                return
            if kind != "UPDATE_ROUND_START":
                continue
            round_number = int(item["body"]["round"])
            if round_number in handled_rounds:
                continue
            handled_rounds.add(round_number)
            download = timed_request(
                session,
                results,
                "download",
                "GET",
                f"{base}models/{item['body']['global_model_uuid']}/",
            )
            if download is None:
                continue
            payload = perturbed_state_dict_file(download.content, seed * 1000 + round_number)
            uploaded = timed_request(
                session,
                results,
                "upload",
                "POST",
                f"{base}models/{model_id}/",
                data={"round": str(round_number), "sample_size": str(10 + seed % 7)},
                files={"model_file": ("update.pt", payload, "application/octet-stream")},
            )
            if uploaded is None:
                continue
    results.fail(f"participant {seed} timed out before TRAINING_FINISHED")


def participant_process(
    base: str,
    participants: list[tuple[int, str]],
    training_id: str,
    model_id: str,
    deadline: float,
    ready: Any,
    output: Any,
) -> None:
    """Run one thread per participant; put (latencies, errors) on `output` when all end."""
    import torch

    torch.set_num_threads(1)
    results = Results()
    threads = [
        threading.Thread(
            target=follow_training,
            args=(base, token, training_id, model_id, seed, results, deadline),
            daemon=True,
        )
        for seed, token in participants
    ]
    for thread in threads:
        thread.start()
    ready.release()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 30)
    output.put(results.export())


def inference_process(
    base: str,
    token: str,
    model_id: str,
    features: int,
    callers: int,
    stop: Any,
    ready: Any,
    output: Any,
) -> None:
    """Run `callers` threads that post inference requests until `stop` is set."""
    results = Results()
    body = {"model_id": model_id, "model_input": [[0.1 * i for i in range(features)]] * 8}

    def call_in_loop() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {token}"
        while not stop.is_set():
            response = timed_request(
                session, results, "inference", "POST", f"{base}inference/", json=body
            )
            if response is None:
                time.sleep(0.5)

    threads = [threading.Thread(target=call_in_loop, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    ready.release()
    for thread in threads:
        thread.join()
    output.put(results.export())


def get_json(base: str, token: str, path: str) -> Any:
    response = requests.get(
        f"{base}{path}", headers={"Authorization": f"Token {token}"}, timeout=60
    )
    response.raise_for_status()
    return response.json()


def run_participants(args: argparse.Namespace) -> None:
    sizes = [args.features, args.hidden, args.hidden, 4]
    with tempfile.TemporaryDirectory(prefix="fedserve-load-") as temporary:
        env = server_environment(Path(temporary) / "data", args.server_threads)
        actor_token, participants = create_users(env, args.participants)
        port = free_port()
        base = f"http://127.0.0.1:{port}/api/"
        log_path = args.server_log or Path(temporary) / "server.log"
        server = start_server(env, port, log_path)
        print(f"server process {server.pid}, log {log_path}", flush=True)
        context = multiprocessing.get_context("spawn")
        workers: list[Any] = []
        try:
            archive = torchscript_bytes(mlp(sizes))
            model_id = upload_global_model(base, actor_token, "load-mlp", archive, args.features)
            inference_model_id = upload_global_model(
                base, actor_token, "load-inference-mlp", archive, args.features
            )
            training_id = create_and_start_training(
                base, actor_token, model_id, [user_id for user_id, _ in participants], args.rounds
            )
            parameters = sum(a * b + b for a, b in itertools.pairwise(sizes))
            print(
                f"participants={args.participants} processes={args.processes} "
                f"rounds={args.rounds} inference_callers={args.inference_callers} "
                f"FEDSERVE_THREADS={args.server_threads} model parameters={parameters} "
                "aggregation=FedAvg model tests=off notifications=long polling"
            )

            ready = context.Semaphore(0)
            output = context.Queue()
            stop = context.Event()
            deadline = time.monotonic() + args.timeout
            seeded = list(enumerate(token for _, token in participants))
            for index in range(args.processes):
                workers.append(
                    context.Process(
                        target=participant_process,
                        args=(
                            base,
                            seeded[index :: args.processes],
                            training_id,
                            model_id,
                            deadline,
                            ready,
                            output,
                        ),
                    )
                )
            inference_worker = context.Process(
                target=inference_process,
                args=(
                    base,
                    actor_token,
                    inference_model_id,
                    args.features,
                    args.inference_callers,
                    stop,
                    ready,
                    output,
                ),
            )
            for worker in [*workers, inference_worker]:
                worker.start()
            for _ in range(len(workers) + 1):
                ready.acquire()

            started = time.monotonic()
            start_training(base, actor_token, training_id)
            collected = [output.get(timeout=args.timeout + 120) for _ in workers]
            elapsed = time.monotonic() - started
            stop.set()
            collected.append(output.get(timeout=180))
            for worker in [*workers, inference_worker]:
                worker.join(timeout=60)
            workers.append(inference_worker)

            latencies: dict[str, list[float]] = defaultdict(list)
            errors: list[str] = []
            for part_latencies, part_errors in collected:
                for kind, values in part_latencies.items():
                    latencies[kind].extend(values)
                errors.extend(part_errors)
            training = get_json(base, actor_token, f"trainings/{training_id}/")
            metadata = get_json(base, actor_token, f"models/{model_id}/metadata/")
            print(
                f"training state={training['state']} global model round={metadata['round']} "
                f"(expected C and {args.rounds})"
            )
            print(f"total time from start to the last TRAINING_FINISHED: {elapsed:.1f} s")
            if args.inference_callers:
                rate = len(latencies["inference"]) / elapsed
                print(f"inference requests per second: {rate:.1f}")
            print_errors(errors)
            print_latencies(latencies)
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                    worker.join()
            stop_server(server)
            print_server_problems(log_path)


# --- memory -----------------------------------------------------------------------------


def run_memory(args: argparse.Namespace) -> None:
    # With the default sizes 4096-4096-2048-16: about 25.2 million float32 parameters,
    # 101 MB.
    sizes = [args.features, args.hidden, args.hidden_2, 16]
    parameters = sum(a * b + b for a, b in itertools.pairwise(sizes))
    with tempfile.TemporaryDirectory(prefix="fedserve-load-") as temporary:
        env = server_environment(Path(temporary) / "data", args.server_threads)
        actor_token, participants = create_users(env, args.participants)
        port = free_port()
        base = f"http://127.0.0.1:{port}/api/"
        log_path = Path(temporary) / "server.log"
        server = start_server(env, port, log_path)
        try:
            archive = torchscript_bytes(mlp(sizes))
            model_id = upload_global_model(base, actor_token, "memory-mlp", archive, args.features)
            del archive
            training_id = create_and_start_training(
                base, actor_token, model_id, [user_id for user_id, _ in participants], args.rounds
            )
            print(
                f"rounds={args.rounds} participants={args.participants} "
                f"model parameters={parameters} ({parameters * 4 / 1e6:.0f} MB float32) "
                "aggregation=FedAvg model tests=off notifications=long polling"
            )
            processes = psutil.Process(server.pid).children(recursive=True)
            print(
                f"server RSS before the training: {server_rss_bytes(server.pid) / 1e6:.0f} MB "
                f"(the serve process and {len(processes)} child processes: "
                f"{', '.join(sorted({child.name() for child in processes}))})"
            )

            results = Results()
            deadline = time.monotonic() + args.timeout
            # Participant 0 reports its notifications: each UPDATE_ROUND_START after the
            # first, and TRAINING_FINISHED, mean that the server finished an aggregation.
            notices: queue.Queue[str] = queue.Queue()
            threads = [
                threading.Thread(
                    target=follow_training,
                    args=(base, token, training_id, model_id, seed, results, deadline),
                    kwargs={"on_notification": notices.put if seed == 0 else None},
                    daemon=True,
                )
                for seed, (_, token) in enumerate(participants)
            ]
            for thread in threads:
                thread.start()
            started = time.monotonic()
            start_training(base, actor_token, training_id)

            rss_per_round: dict[int, int] = {}
            peak = 0
            round_starts = 0
            finished = False
            while not finished and time.monotonic() < deadline:
                if not any(thread.is_alive() for thread in threads):
                    break
                peak = max(peak, server_rss_bytes(server.pid))
                try:
                    kind = notices.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "UPDATE_ROUND_START":
                    round_starts += 1
                    if round_starts == 1:
                        continue
                elif kind == "TRAINING_FINISHED":
                    finished = True
                else:
                    continue
                aggregated = len(rss_per_round) + 1
                rss = server_rss_bytes(server.pid)
                peak = max(peak, rss)
                rss_per_round[aggregated] = rss
                print(
                    f"after round {aggregated:>2}: server RSS {rss / 1e6:7.0f} MB, "
                    f"peak so far {peak / 1e6:7.0f} MB, {time.monotonic() - started:6.1f} s",
                    flush=True,
                )
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()) + 30)
            elapsed = time.monotonic() - started

            latencies, errors = results.export()
            training = get_json(base, actor_token, f"trainings/{training_id}/")
            print(f"training state={training['state']} after {elapsed:.1f} s (expected C)")
            if 1 in rss_per_round and args.rounds in rss_per_round:
                growth = rss_per_round[args.rounds] - rss_per_round[1]
                print(
                    f"RSS growth from round 1 to round {args.rounds}: {growth / 1e6:+.0f} MB "
                    f"({growth / rss_per_round[1] * 100:+.1f} %)"
                )
            else:
                print("RSS growth: not measured, the training did not reach every round")
            print_errors(errors)
            print_latencies(latencies)
        finally:
            stop_server(server)
            print_server_problems(log_path)


# --- command line -----------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scenarios = parser.add_subparsers(dest="scenario", required=True)

    crowd = scenarios.add_parser("participants", help="many participants plus inference load")
    crowd.add_argument("--participants", type=int, default=200, help="participant count")
    crowd.add_argument("--processes", type=int, default=4, help="participant worker processes")
    crowd.add_argument("--rounds", type=int, default=3, help="training rounds")
    crowd.add_argument("--inference-callers", type=int, default=50, help="inference threads")
    crowd.add_argument("--features", type=int, default=32, help="MLP input features")
    crowd.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    crowd.add_argument(
        "--server-threads", type=int, default=300, help="FEDSERVE_THREADS of the server"
    )
    crowd.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    crowd.add_argument(
        "--server-log",
        type=Path,
        help="file that keeps the server's log after the run (default: a temporary file)",
    )

    memory = scenarios.add_parser("memory", help="server RSS over rounds of a ~100 MB model")
    memory.add_argument("--participants", type=int, default=3, help="participant count")
    memory.add_argument("--rounds", type=int, default=20, help="training rounds")
    memory.add_argument("--features", type=int, default=4096, help="MLP input features")
    memory.add_argument("--hidden", type=int, default=4096, help="first hidden width")
    memory.add_argument("--hidden-2", type=int, default=2048, help="second hidden width")
    memory.add_argument(
        "--server-threads", type=int, default=32, help="FEDSERVE_THREADS of the server"
    )
    memory.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.scenario == "participants":
        run_participants(args)
    else:
        run_memory(args)


if __name__ == "__main__":
    main()
