"""`fedserve demo` as a user runs it: a subprocess with its own server and participants."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_demo(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedserve", "demo", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_short_demo_writes_report_and_plot(tmp_path: Path) -> None:
    output = tmp_path / "demo"
    result = run_demo(
        "--participants", "2", "--rounds", "2", "--epochs", "2", "--mode", "mixed",
        "--seed", "3", "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    # Progress: one line per round while the training runs, then the table.
    assert "round   1: test accuracy" in result.stdout
    assert "round   2: test accuracy" in result.stdout
    assert "1 by webhook, 1 by polling" in result.stdout

    report = json.loads((output / "report.json").read_text())
    assert report["settings"]["participants"] == 2
    assert report["settings"]["rounds"] == 2
    assert report["settings"]["seed"] == 3
    assert [row["round"] for row in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert 0 <= row["accuracy"] <= 1
        assert row["loss"] > 0
        assert 0 <= row["participants_accuracy"] <= 1
    assert report["final_accuracy"] == report["rounds"][-1]["accuracy"]
    # Two rounds of two epochs already beat guessing among ten digits by far.
    assert report["final_accuracy"] > 0.5
    assert 0 < report["centralized_accuracy"] <= 1
    assert len(report["local_accuracies"]) == 2
    assert report["local_mean_accuracy"] == pytest.approx(sum(report["local_accuracies"]) / 2)
    assert sum(report["participant_sizes"]) > 1000

    inference = report["inference"]
    assert inference["method"] == "MC_DROPOUT"
    assert inference["measure"] == "predictive entropy"
    assert inference["samples"] == 360
    assert 0 <= inference["certain_half_accuracy"] <= 1
    assert 0 <= inference["uncertain_half_accuracy"] <= 1
    for step in ("server_start", "setup", "training", "baselines", "inference", "total"):
        assert report["timings"][step] >= 0

    plot = (output / "accuracy.png").read_bytes()
    assert plot.startswith(PNG_SIGNATURE)
    assert len(plot) > 10_000
    assert (output / "server.log").stat().st_size > 0
    assert "training_finished" in (output / "participant-1.log").read_text()


def test_demo_rejects_single_participant(tmp_path: Path) -> None:
    result = run_demo("--participants", "1", "--output", str(tmp_path / "demo"), timeout=60)
    assert result.returncode != 0
    assert "--participants must be at least 2, not 1" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_demo_rejects_unknown_aggregation(tmp_path: Path) -> None:
    result = run_demo("--aggregation", "FedSGD", "--output", str(tmp_path / "demo"), timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'FedSGD'" in result.stderr


def test_demo_fails_clearly_on_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_demo(
            "--participants", "2", "--port", str(port), "--output", str(tmp_path / "demo"),
            timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"Port {port} on 127.0.0.1 is not available" in result.stderr
    assert not (tmp_path / "demo").exists()
