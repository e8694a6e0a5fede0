import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("peak_memory.py")
ROOT = Path(__file__).resolve().parents[2]
LINUX_ONLY = "the probe reads RssAnon from /proc/self/status"


def run_probe(*args: str) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, str(PROBE), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )
    return json.loads(completed.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status"
)
def test_peak_memory_under_three_models():
    figures = run_probe("20")

    assert figures["growth"] < 3 * figures["model_bytes"], figures
    # Weighted by i, the mean of the values i = 1..20 is sum(i^2) / sum(i) = 2870 / 210.
    assert figures["weight_0"] == pytest.approx(2870 / 210, rel=1e-6)
    assert figures["num_batches_tracked"] == 20


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status"
)
def test_peak_memory_probe_sees_kept_updates():
    figures = run_probe("5", "--keep-all")

    assert figures["growth"] > 5 * figures["model_bytes"], figures
