"""The demo's outputs: the progress table, report.json and the accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_table(rounds: list[dict[str, Any]]) -> str:
    """Return a text table with one row per round: global test and participants' metrics."""
    header = (
        f"{'round':>5}  {'test accuracy':>13}  {'test loss':>9}  "
        f"{'participants: val accuracy':>26}  {'val loss':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rounds:
        accuracy, loss = _number(row.get("accuracy")), _number(row.get("loss"))
        val_accuracy = _number(row.get("participants_accuracy"))
        val_loss = _number(row.get("participants_loss"))
        lines.append(
            f"{row['round']:>5}  {accuracy:>13}  {loss:>9}  {val_accuracy:>26}  {val_loss:>8}"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot_accuracy(path: Path, report: dict[str, Any]) -> None:
    """Plot the global model's test accuracy per round against the two baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row for row in report["rounds"] if row.get("accuracy") is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    axes.plot(
        [row["round"] for row in rounds],
        [row["accuracy"] for row in rounds],
        marker="o",
        label=f"federated ({report['settings']['aggregation']}), held-out test set",
    )
    validation = [row for row in report["rounds"] if row.get("participants_accuracy") is not None]
    if validation:
        axes.plot(
            [row["round"] for row in validation],
            [row["participants_accuracy"] for row in validation],
            marker=".",
            linestyle="--",
            label="participants' mean validation accuracy",
        )
    axes.axhline(report["centralized_accuracy"], color="green", linestyle=":", label="centralised")
    axes.axhline(
        report["local_mean_accuracy"], color="red", linestyle=":", label="each alone (mean)"
    )
    axes.set_xlabel("round")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_title("fedserve demo: handwritten digits")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
