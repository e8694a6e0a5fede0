"""A 1 GB model goes up and down through a real `fedserve serve` with flat server memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from benchmarks.transfer import (
    RssSampler,
    download,
    register,
    running_fedserve,
    sha256_of,
    upload_model,
    write_model_file,
)

SIZE_BYTES = 1_000_000_000
# Growth of the server's resident memory allowed while 1 GB passes through it.
MAX_RSS_GROWTH_BYTES = 100_000_000


@pytest.mark.slow
@pytest.mark.e2e
def test_one_gigabyte_model_round_trip(tmp_path: Path):
    model_path = tmp_path / "big.pt"
    write_model_file(model_path, SIZE_BYTES)
    expected_digest = sha256_of(model_path)
    warmup_path = tmp_path / "warmup.pt"
    write_model_file(warmup_path, 1_000_000)

    with running_fedserve(tmp_path / "data") as (base, pid):
        headers = register(base)
        # Imports and caches fill on the first upload, not on the one that is measured.
        assert upload_model(base, headers, warmup_path).status_code == 201

        with RssSampler(pid) as upload_memory:
            response = upload_model(base, headers, model_path)
        assert response.status_code == 201, response.text
        model_id = response.json()["model_id"]

        with RssSampler(pid) as download_memory:
            size, digest = download(f"{base}/api/models/{model_id}/", headers)

        head = requests.get(
            f"{base}/api/models/{model_id}/", headers=headers, stream=True, timeout=30
        )
        head.close()

    assert size == model_path.stat().st_size
    assert digest == expected_digest
    assert head.headers["Content-Length"] == str(size)
    assert head.headers["Content-Disposition"] == f'filename="model-{model_id}.pt"'
    assert upload_memory.growth < MAX_RSS_GROWTH_BYTES, upload_memory.growth
    assert download_memory.growth < MAX_RSS_GROWTH_BYTES, download_memory.growth
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


@pytest.mark.e2e
def test_oversized_upload_gets_413_from_server(tmp_path: Path):
    model_path = tmp_path / "model.pt"
    write_model_file(model_path, 3_000_000)

    with running_fedserve(tmp_path / "data", FEDSERVE_MAX_UPLOAD_BYTES="1048576") as (base, _):
        response = upload_model(base, register(base), model_path)

    assert response.status_code == 413
    assert "1048576 bytes (1.0 MB)" in response.json()["detail"]
