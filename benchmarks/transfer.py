"""Measure model upload and download through `fedserve serve` against raw loopback HTTP.

Starts `fedserve serve` on 127.0.0.1 with a fresh data directory and, all multipart and
streamed from disk by the same client code:
- uploads a TorchScript archive as a global model (`POST /api/models/`) and downloads it,
- starts a one-participant training of it and uploads a torch.save state dict of the same
  size as the participant's local update (`POST /api/models/<id>/`), which the server also
  checks for shapes and finite values.
The same bytes then go through a minimal socket server that discards a request body,
writes it to a file, or sends a file with sendfile. These raw figures show what the
loopback and the HTTP client reach on this machine in the same run. The server process's
peak RSS growth (with its children) is sampled during each transfer. Everything runs
`--repeats` times, raw and fedserve in turn, and the figures are the median and best of
the runs; the model is deleted after each run.

Run from the repository root (as a module, so that `requests` is the installed package):

    .venv/bin/python -m benchmarks.transfer --size-mb 512
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import requests
import torch

CHUNK_BYTES = 1024 * 1024
MB = 1_000_000


# Files and request bodies


class _BigParameter(torch.nn.Module):
    def __init__(self, values: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[0]


def write_model_file(path: Path, size_bytes: int) -> None:
    """Write a TorchScript archive of about `size_bytes` (one float32 parameter)."""
    module = torch.jit.script(_BigParameter(size_bytes // 4))
    torch.jit.save(module, str(path))


def write_update_file(path: Path, size_bytes: int) -> None:
    """Write a torch.save state dict that fits the model of `write_model_file`: a local
    update. Its values are random, so the server's finite-value check reads real data."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(size_bytes // 4, generator=generator)
    torch.save({"weight": weight}, str(path))


class MultipartFileBody:
    """A multipart/form-data body that streams one file from disk; `len()` is its length.

    requests sends an object with `__iter__` and `__len__` chunk by chunk with a
    Content-Length header, so neither side keeps the file in memory.
    """

    def __init__(self, fields: dict[str, str], file_field: str, path: Path) -> None:
        self.boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
            for name, value in fields.items()
        )
        self._head = (
            head
            + (
                f'--{self.boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
        )
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._path = path

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self._head) + self._path.stat().st_size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        with self._path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk
        yield self._tail


# The server under test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_fedserve(data_dir: Path, **environment: str) -> Iterator[tuple[str, int]]:
    """Run `fedserve serve` on a free port; yield its base URL and process id."""
    port = free_port()
    env = {
        **os.environ,
        "FEDSERVE_DATA_DIR": str(data_dir),
        "FEDSERVE_LOG_LEVEL": "WARNING",
        **environment,
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
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{base}/api/schema/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"fedserve serve exited with code {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("fedserve serve did not respond within 90 s")
            time.sleep(0.2)
        yield base, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def register(base: str, **fields: Any) -> dict[str, str]:
    """Register a fresh user; return the Authorization header for it."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    response = requests.post(
        f"{base}/api/users/",
        json={"username": name, "password": f"{name}-password-1", **fields},
        timeout=30,
    )
    response.raise_for_status()
    return {"Authorization": f"Token {response.json()['token']}"}


def user_id(base: str, headers: dict[str, str]) -> Any:
    response = requests.get(f"{base}/api/users/myself/", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["id"]


def start_update_round(base: str, actor: dict[str, str], participant_id: Any, model_id: str) -> str:
    """Start a one-participant FedAvg training of a model; return the training id once
    round 0 waits for local updates."""
    response = requests.post(
        f"{base}/api/trainings/",
        headers=actor,
        json={
            "model_id": model_id,
            "target_num_updates": 1,
            "metric_names": [],
            "aggregation_method": "FedAvg",
            "clients": [participant_id],
            "options": {"skip_model_tests": True},
        },
        timeout=60,
    )
    response.raise_for_status()
    training_id: str = response.json()["training_id"]
    requests.post(
        f"{base}/api/trainings/{training_id}/start/", headers=actor, timeout=60
    ).raise_for_status()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        training = requests.get(f"{base}/api/trainings/{training_id}/", headers=actor, timeout=30)
        training.raise_for_status()
        if training.json().get("phase") == "UPDATE":
            return training_id
        time.sleep(0.2)
    raise RuntimeError(f"training {training_id} did not reach its UPDATE phase within 120 s")


def upload_update(
    base: str, headers: dict[str, str], model_id: str, path: Path
) -> requests.Response:
    body = MultipartFileBody({"round": "0", "sample_size": "10"}, "model_file", path)
    return requests.post(
        f"{base}/api/models/{model_id}/",
        data=body,
        headers={**headers, "Content-Type": body.content_type},
        timeout=600,
    )


class RssSampler:
    """Sample the resident memory of a process and its children in a background thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = self.current()
        self.peak = self.baseline

    def current(self) -> int:
        processes = [self._process, *self._process.children(recursive=True)]
        total = 0
        for process in processes:
            # A child may exit between listing and reading it.
            with suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def upload_model(base: str, headers: dict[str, str], path: Path) -> requests.Response:
    body = MultipartFileBody(
        {"name": path.stem, "description": "transfer benchmark"}, "model_file", path
    )
    return requests.post(
        f"{base}/api/models/",
        data=body,
        headers={**headers, "Content-Type": body.content_type},
        timeout=600,
    )


def download(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """Download a URL in chunks; return the byte count and the SHA-256 of the body."""
    digest = hashlib.sha256()
    size = 0
    with requests.get(url, headers=headers, stream=True, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_content(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# Raw loopback reference


class RawLoopbackServer:
    """A minimal HTTP/1.1 server on a socket: GET sends a file, and POST discards the body
    or, with `spool_dir`, writes it to a new file there (deleted at once)."""

    def __init__(self, path: Path, spool_dir: Path | None = None) -> None:
        self._path = path
        self._spool_dir = spool_dir
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                self._handle(connection)

    def _handle(self, connection: socket.socket) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = connection.recv(65536)
            if not data:
                return
            buffer += data
        head, body_start = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method = lines[0].split(" ", 1)[0]
        headers = {
            name.strip().lower(): value.strip()
            for name, value in (line.split(":", 1) for line in lines[1:] if ":" in line)
        }
        if method == "POST":
            remaining = int(headers.get("content-length", "0")) - len(body_start)
            sink = bytearray(CHUNK_BYTES)
            with ExitStack() as stack:
                spool = None
                if self._spool_dir is not None:
                    spool = stack.enter_context(tempfile.TemporaryFile(dir=self._spool_dir))
                while remaining > 0:
                    received = connection.recv_into(sink, min(len(sink), remaining))
                    if received == 0:
                        return
                    if spool is not None:
                        spool.write(memoryview(sink)[:received])
                    remaining -= received
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            size = self._path.stat().st_size
            connection.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
                "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
            )
            with self._path.open("rb") as handle:
                connection.sendfile(handle)

    def close(self) -> None:
        self._listener.close()


def raw_upload(path: Path, spool_dir: Path | None = None) -> float:
    """Return raw loopback upload throughput in MB/s for the file's bytes; with `spool_dir`
    the server writes the body to a file there, as fedserve does."""
    server = RawLoopbackServer(path, spool_dir)
    try:
        body = MultipartFileBody({"name": "raw"}, "model_file", path)
        start = time.perf_counter()
        requests.post(
            f"http://127.0.0.1:{server.port}/",
            data=body,
            headers={"Content-Type": body.content_type},
            timeout=600,
        ).raise_for_status()
        seconds = time.perf_counter() - start
    finally:
        server.close()
    return path.stat().st_size / MB / seconds


def raw_download(path: Path) -> float:
    """Return raw loopback download (sendfile) throughput in MB/s for the file's bytes."""
    server = RawLoopbackServer(path)
    url = f"http://127.0.0.1:{server.port}/"
    size = path.stat().st_size
    try:
        start = time.perf_counter()
        downloaded, _ = download(url, {})
        download_seconds = time.perf_counter() - start
        assert downloaded == size
    finally:
        server.close()
    return size / MB / download_seconds


# The benchmark


def wait_until_finished(base: str, actor: dict[str, str], training_id: str) -> None:
    """Wait until a training has aggregated its update and completed, so that its
    aggregation does not run during the next measurement."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        training = requests.get(f"{base}/api/trainings/{training_id}/", headers=actor, timeout=30)
        training.raise_for_status()
        if training.json().get("state") in ("C", "E"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"training {training_id} did not complete within 300 s")


def measure(size_mb: int, work_dir: Path, repeats: int) -> dict[str, Any]:
    """Run the whole benchmark in `work_dir` `repeats` times; return the figures of each run.

    Each repetition measures the raw references and fedserve one after the other, so that
    a change in the load from other processes affects both alike.
    """
    model_path = work_dir / "model.pt"
    write_model_file(model_path, size_mb * MB)
    size = model_path.stat().st_size
    expected_digest = sha256_of(model_path)
    warmup_path = work_dir / "warmup.pt"
    write_model_file(warmup_path, 4 * MB)
    update_path = work_dir / "update.pt"
    write_update_file(update_path, size_mb * MB)
    update_size = update_path.stat().st_size
    spool_dir = work_dir / "raw-spool"
    spool_dir.mkdir()

    runs: list[dict[str, float]] = []
    with running_fedserve(work_dir / "data") as (base, pid):
        headers = register(base, actor=True)
        # A small upload and download first, so imports and caches are warm before sampling.
        warmup = upload_model(base, headers, warmup_path)
        warmup.raise_for_status()
        download(f"{base}/api/models/{warmup.json()['model_id']}/", headers)

        for _ in range(repeats):
            figures = {
                "raw_upload_mb_s": raw_upload(model_path),
                "raw_upload_to_file_mb_s": raw_upload(model_path, spool_dir),
                "raw_download_mb_s": raw_download(model_path),
            }
            with RssSampler(pid) as upload_memory:
                start = time.perf_counter()
                response = upload_model(base, headers, model_path)
                upload_seconds = time.perf_counter() - start
            response.raise_for_status()
            model_id = response.json()["model_id"]

            with RssSampler(pid) as download_memory:
                start = time.perf_counter()
                downloaded, digest = download(f"{base}/api/models/{model_id}/", headers)
                download_seconds = time.perf_counter() - start
            if downloaded != size or digest != expected_digest:
                raise RuntimeError("the downloaded model differs from the uploaded file")

            participant = register(base, client=True)
            training_id = start_update_round(base, headers, user_id(base, participant), model_id)
            with RssSampler(pid) as update_memory:
                start = time.perf_counter()
                response = upload_update(base, participant, model_id, update_path)
                update_seconds = time.perf_counter() - start
            response.raise_for_status()
            wait_until_finished(base, headers, training_id)
            # Deleting the model removes its files, so the disk does not fill up over runs.
            requests.delete(
                f"{base}/api/models/{model_id}/", headers=headers, timeout=120
            ).raise_for_status()

            runs.append(
                {
                    **figures,
                    "upload_mb_s": size / MB / upload_seconds,
                    "download_mb_s": size / MB / download_seconds,
                    "update_mb_s": update_size / MB / update_seconds,
                    "upload_rss_growth_mb": upload_memory.growth / MB,
                    "download_rss_growth_mb": download_memory.growth / MB,
                    "update_rss_growth_mb": update_memory.growth / MB,
                }
            )
    return {"size_bytes": size, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512, help="model file size in MB")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measurements of each transfer (default 3)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="folder for files (default: a temp folder)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        figures = measure(args.size_mb, Path(folder), args.repeats)
    runs = figures["runs"]

    print(f"model file: {figures['size_bytes'] / MB:.0f} MB (TorchScript, one parameter)")
    print(
        f"CPU: {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{len(runs)} runs; MB/s as median (best), RSS growth as the largest of the runs"
    )
    rows = (
        ("global model upload (POST /api/models/, TorchScript)", "upload", "upload"),
        ("local update upload (POST /api/models/<id>/, state dict)", "update", "upload"),
        ("global model download (GET /api/models/<id>/)", "download", "download"),
    )
    for label, key, direction in rows:
        speeds = [run[f"{key}_mb_s"] for run in runs]
        raws = [run[f"raw_{direction}_mb_s"] for run in runs]
        shares = [run[f"{key}_mb_s"] / run[f"raw_{direction}_mb_s"] for run in runs]
        growth = max(run[f"{key}_rss_growth_mb"] for run in runs)
        print(
            f"{label}:\n  fedserve {statistics.median(speeds):6.0f} ({max(speeds):.0f}) MB/s, "
            f"raw loopback {statistics.median(raws):6.0f} ({max(raws):.0f}) MB/s, "
            f"share of raw in the same run {statistics.median(shares):.0%} "
            f"({max(shares):.0%}), server peak RSS growth {growth:.0f} MB"
        )
    to_file = [run["raw_upload_to_file_mb_s"] for run in runs]
    print(
        "raw loopback upload writing the body to a file in the same filesystem: "
        f"{statistics.median(to_file):.0f} ({max(to_file):.0f}) MB/s"
    )
    print(
        "per run (MB/s): "
        + "; ".join(
            f"upload {run['upload_mb_s']:.0f}/{run['raw_upload_mb_s']:.0f}, "
            f"update {run['update_mb_s']:.0f}, download {run['download_mb_s']:.0f}/"
            f"{run['raw_download_mb_s']:.0f}, raw to file {run['raw_upload_to_file_mb_s']:.0f}"
            for run in runs
        )
    )


if __name__ == "__main__":
    main()
