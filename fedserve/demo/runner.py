"""The demo's conductor: server, users, training, monitoring, baselines and inference."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedserve.client import Client
from fedserve.demo import baselines, report
from fedserve.demo.data import DemoData, make_demo_data
from fedserve.demo.learning import build_model, evaluate
from fedserve.demo.processes import (
    ChildProcess,
    DemoError,
    check_port_free,
    child_environment,
    free_port,
    start_server,
    stop_all,
)
from fedserve.demo.settings import DemoSettings, TrainingSettings

logger = logging.getLogger(__name__)

# Models kept for the ENSEMBLE method: the global models of the last rounds.
ENSEMBLE_SIZE = 3
MC_SAMPLES = 30


def say(message: str) -> None:
    print(message, flush=True)


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._begin = time.monotonic()

    @contextlib.contextmanager
    def measure(self, step: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = round(time.monotonic() - started, 3)

    def total(self) -> float:
        return round(time.monotonic() - self._begin, 3)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the demo end to end and return the report; raise DemoError on failure."""
    torch.set_num_threads(1)
    if settings.port is not None:
        check_port_free(settings.port)
    output = settings.output
    output.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()

    with clock.measure("data"):
        data = make_demo_data(
            participants=settings.participants, seed=settings.seed, alpha=settings.alpha
        )
        shard_dir = output / "shards"
        shard_dir.mkdir(exist_ok=True)
        for index, shard in enumerate(data.shards):
            shard.save(shard_dir / f"participant-{index + 1}.npz")
    sizes = [len(shard.train_y) for shard in data.shards]
    say(
        f"Data: {sum(sizes)} training images split non-IID (Dirichlet alpha {settings.alpha}) "
        f"over {settings.participants} participants {sizes}; {len(data.test_y)} held out "
        "for testing."
    )

    children: list[ChildProcess] = []
    with tempfile.TemporaryDirectory(prefix="fedserve-demo-") as data_dir:
        try:
            # Participants start first: their PyTorch import overlaps the server's start.
            participants = _spawn_participants(settings)
            children.extend(participants)
            with clock.measure("server_start"):
                port = settings.port or free_port()
                server, base_url = start_server(Path(data_dir), port, output / "server.log")
                children.append(server)
            say(f"Server: fedserve serve on {base_url} (log in {output / 'server.log'}).")
            result = _federate(settings, data, base_url, server, participants, clock)
        finally:
            stop_all(children)

    with clock.measure("baselines"):
        local_settings = TrainingSettings(
            epochs=settings.epochs, learning_rate=settings.learning_rate
        )
        total_epochs = settings.rounds * settings.epochs * _passes_per_round(settings)
        centralized = baselines.centralized_accuracy(
            data, local_settings, seed=settings.seed, epochs=total_epochs
        )
        local = baselines.local_accuracies(
            data, local_settings, seed=settings.seed, epochs=total_epochs
        )

    summary: dict[str, Any] = {
        "settings": settings.to_json(),
        "final_accuracy": result["final_accuracy"],
        "final_loss": result["final_loss"],
        "centralized_accuracy": centralized,
        "local_accuracies": local,
        "local_mean_accuracy": float(np.mean(local)),
        "rounds": result["rounds"],
        "inference": result["inference"],
        "participant_sizes": sizes,
        "training_id": result["training_id"],
        "timings": {**clock.timings, "total": clock.total()},
    }

    say("")
    say(report.format_table(summary["rounds"]))
    say("")
    say(
        f"Final global accuracy {summary['final_accuracy']:.4f}; centralised training "
        f"{centralized:.4f}; each participant alone {summary['local_mean_accuracy']:.4f} on "
        "average "
        f"({', '.join(f'{a:.3f}' for a in local)})."
    )
    inference = summary["inference"]
    if inference.get("certain_half_accuracy") is not None:
        say(
            f"Inference ({inference['method']}, {inference['measure']}): accuracy "
            f"{inference['accuracy']:.4f} overall, {inference['certain_half_accuracy']:.4f} on the "
            f"most certain half, {inference['uncertain_half_accuracy']:.4f} on the least certain "
            "half."
        )
    report.write_report(output / "report.json", summary)
    report.plot_accuracy(output / "accuracy.png", summary)
    say(
        f"Report: {output / 'report.json'}, plot: {output / 'accuracy.png'} "
        f"({clock.total():.1f} s)."
    )
    return summary


def _passes_per_round(settings: DemoSettings) -> int:
    """Local training passes per aggregation round: FedDC trains once per daisy-chain step."""
    return settings.daisy_chain_period if settings.aggregation == "FedDC" else 1


def _spawn_participants(settings: DemoSettings) -> list[ChildProcess]:
    """Start one process per participant; each waits for its assignment on standard input."""
    processes = []
    for index in range(settings.participants):
        number = index + 1
        mode = settings.participant_mode(index)
        webhook_port = free_port() if mode == "webhook" else 0
        ready = settings.output / "shards" / f"participant-{number}.ready"
        ready.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "fedserve.demo.participant",
            "--assignment", "-",
            "--shard", str(settings.output / "shards" / f"participant-{number}.npz"),
            "--index", str(number),
            "--seed", str(settings.seed),
            "--mode", mode,
            "--webhook-port", str(webhook_port),
            "--ready-file", str(ready),
            "--epochs", str(settings.epochs),
            "--learning-rate", str(settings.learning_rate),
        ]  # fmt: skip
        log_path = settings.output / f"participant-{number}.log"
        child = ChildProcess(
            f"participant {number}", command, log_path, child_environment(), stdin_pipe=True
        )
        child.webhook_port = webhook_port
        child.ready_file = ready
        processes.append(child)
    return processes


def _federate(
    settings: DemoSettings,
    data: DemoData,
    base_url: str,
    server: ChildProcess,
    participants: list[ChildProcess],
    clock: Stopwatch,
) -> dict[str, Any]:
    with clock.measure("setup"):
        actor = Client.register(
            base_url, "demo-actor", secrets.token_urlsafe(16), actor=True, client=False
        )
        tokens, user_ids = [], []
        for index, child in enumerate(participants):
            endpoint = f"http://127.0.0.1:{child.webhook_port}/" if child.webhook_port else ""
            participant = Client.register(
                base_url,
                f"demo-participant-{index + 1}",
                secrets.token_urlsafe(16),
                client=True,
                message_endpoint=endpoint,
            )
            tokens.append(str(participant.token))
            user_ids.append(str(participant.myself()["id"]))
            participant.close()

        model_id = actor.upload_model(
            build_model(settings.seed),
            name="digits-mlp",
            description="64-128-10 perceptron with dropout for 8x8 handwritten digits",
            input_shape=[None, 64],
        )
        options: dict[str, Any] = {"uncertainty": {"N": MC_SAMPLES, "softmax": True}}
        if settings.aggregation == "FedDC":
            options["daisy_chain_period"] = settings.daisy_chain_period
        training_id = actor.create_training(
            model_id,
            clients=user_ids,
            target_num_updates=settings.rounds,
            aggregation_method=settings.aggregation,
            uncertainty_method=settings.uncertainty,
            metric_names=["accuracy", "loss"],
            options=options,
        )
        say(
            f"Users: actor and {settings.participants} participants registered; "
            f"training {training_id}."
        )

        for child, token in zip(participants, tokens, strict=True):
            child.send_line(json.dumps({"url": base_url, "training": training_id, "token": token}))
        _wait_for_ready(participants, timeout=180.0)
        modes = [settings.participant_mode(i) for i in range(settings.participants)]
        say(
            f"Participants: {settings.participants} processes ready "
            f"({modes.count('webhook')} by webhook, {modes.count('poll')} by polling)."
        )

    with clock.measure("training"):
        actor.start_training(training_id)
        chained = ""
        if settings.aggregation == "FedDC":
            total = settings.rounds * settings.daisy_chain_period
            chained = f" ({total} rounds with daisy chaining)"
        say(f"Training: {settings.rounds} rounds of {settings.aggregation}{chained} started.")
        monitor = RoundMonitor(
            actor, training_id, model_id, data, [server, *participants], settings
        )
        monitor.follow(timeout=settings.timeout)

    deadline = time.monotonic() + 60
    for child in participants:
        while not child.exited() and time.monotonic() < deadline:
            time.sleep(0.1)
        if child.failed():
            raise DemoError(child.describe_failure())

    rounds = monitor.rounds_with_participant_metrics()
    with clock.measure("inference"):
        inference = _measure_inference(actor, settings, model_id, monitor, data)
    actor.close()
    return {
        "training_id": training_id,
        "rounds": rounds,
        "final_accuracy": monitor.final["accuracy"],
        "final_loss": monitor.final["loss"],
        "inference": inference,
    }


def _wait_for_ready(participants: list[ChildProcess], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(
        child.ready_file is not None and child.ready_file.exists() for child in participants
    ):
        for child in participants:
            if child.exited():
                raise DemoError(child.describe_failure())
        if time.monotonic() > deadline:
            raise DemoError(
                f"The participants were not ready within {timeout:.0f} s; see the "
                "participant-*.log files in the output folder."
            )
        time.sleep(0.1)


class RoundMonitor:
    """Follow a training as its actor and test each round's global model on held-out data.

    The actor gets no notification per round, so the monitor polls the training's round
    and downloads the global model when it changes. A round switch happens only after
    every participant trained and tested, which takes far longer than one poll, so every
    round is seen. A round that is missed anyway shows as n/a in the table.
    """

    def __init__(
        self,
        actor: Client,
        training_id: str,
        model_id: str,
        data: DemoData,
        children: list[ChildProcess],
        settings: DemoSettings,
    ) -> None:
        self.actor = actor
        self.training_id = training_id
        self.model_id = model_id
        self.data = data
        self.children = children
        self.settings = settings
        self.results: dict[int, dict[str, float]] = {}
        self.model_bytes: dict[int, bytes] = {}
        self.final: dict[str, float] = {}
        self._started = time.monotonic()

    def follow(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen_round = 0
        while True:
            # A participant exits with 0 once the training finished; anything else is a failure.
            for child in self.children:
                if child.failed():
                    raise DemoError(child.describe_failure())
            training = self.actor.get_training(self.training_id)
            state = training["state"]
            if state == "E":
                raise DemoError(
                    f"The server set training {self.training_id} to the error state; see "
                    "server.log in the output folder."
                )
            current = int(training["round"])
            if current != seen_round:
                self._record(current)
                seen_round = current
            if state == "C":
                if seen_round not in self.results:
                    self._record(seen_round)
                self.final = self.results[max(self.results)]
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"Training {self.training_id} did not finish within {timeout:.0f} s "
                    f"(state {state}, round {current})."
                )
            time.sleep(0.1)

    def _record(self, round_number: int) -> None:
        payload = self.actor.download_model(self.model_id)
        if int(self.actor.get_training(self.training_id)["round"]) != round_number:
            return  # The next round finished during the download; it is recorded next time.
        if not self.settings.is_aggregation_round(round_number):
            return
        model = torch.jit.load(io.BytesIO(payload))
        metrics = evaluate(model, self.data.test_x, self.data.test_y)
        self.results[round_number] = metrics
        self.model_bytes[round_number] = payload
        for old in sorted(self.model_bytes)[:-ENSEMBLE_SIZE]:
            del self.model_bytes[old]
        elapsed = time.monotonic() - self._started
        say(
            f"  round {round_number:>3}: test accuracy {metrics['accuracy']:.4f}, "
            f"loss {metrics['loss']:.4f} ({elapsed:.1f} s since the start)"
        )

    def rounds_with_participant_metrics(self) -> list[dict[str, Any]]:
        """Return one row per round with the global test metrics and participants' means."""
        reported: dict[int, dict[str, list[float]]] = {}
        for metric in self.actor.model_metrics(self.model_id):
            name = str(metric.get("key") or metric.get("identifier") or metric.get("name") or "")
            value = metric.get("value", metric.get("value_float"))
            if name not in ("accuracy", "loss") or not isinstance(value, int | float):
                continue
            reported.setdefault(int(metric.get("step", 0)), {}).setdefault(name, []).append(
                float(value)
            )

        last = max([*self.results, *reported, 0])
        rows = []
        for round_number in range(1, last + 1):
            if not self.settings.is_aggregation_round(round_number):
                continue
            result = self.results.get(round_number, {})
            means = {
                name: float(np.mean(values))
                for name, values in reported.get(round_number, {}).items()
            }
            rows.append(
                {
                    "round": round_number,
                    "accuracy": result.get("accuracy"),
                    "loss": result.get("loss"),
                    "participants_accuracy": means.get("accuracy"),
                    "participants_loss": means.get("loss"),
                }
            )
        return rows


def _measure_inference(
    actor: Client, settings: DemoSettings, model_id: str, monitor: RoundMonitor, data: DemoData
) -> dict[str, Any]:
    """Predict the held-out images through the server and split them by uncertainty."""
    target = model_id
    if settings.uncertainty == "ENSEMBLE":
        members = []
        for round_number, payload in sorted(monitor.model_bytes.items()):
            members.append(
                actor.upload_model(
                    payload, name=f"digits-mlp round {round_number}", input_shape=[None, 64]
                )
            )
        target = actor.create_mean_model(members, name="digits-mlp ensemble of the last rounds")

    answer = actor.infer(target, data.test_x, seed=settings.seed)
    outputs = np.asarray(answer["inference"], dtype=np.float64).reshape(len(data.test_y), -1)
    predictions = outputs.argmax(axis=1)
    correct = predictions == data.test_y
    uncertainty = answer.get("uncertainty") or {}

    if "predictive_entropy" in uncertainty:
        measure = "predictive entropy"
        entropy = np.asarray(uncertainty["predictive_entropy"], dtype=np.float64)
        scores = entropy.reshape(len(correct), -1).mean(axis=1)
    else:
        # Without probabilities from the server (NONE, or a MEAN model without the softmax
        # option), the entropy of the softmax of the (mean) output ranks the images.
        measure = "entropy of the mean prediction"
        probabilities = _as_probabilities(outputs)
        scores = -(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(axis=1)

    order = np.argsort(scores, kind="stable")
    half = len(order) // 2
    return {
        "method": settings.uncertainty,
        "model_id": target,
        "measure": measure,
        "samples": len(correct),
        "accuracy": float(correct.mean()),
        "certain_half_accuracy": float(correct[order[:half]].mean()),
        "uncertain_half_accuracy": float(correct[order[half:]].mean()),
    }


def _as_probabilities(outputs: np.ndarray) -> np.ndarray:
    rows_sum = outputs.sum(axis=1)
    if np.all(outputs >= 0) and np.allclose(rows_sum, 1.0, atol=1e-3):
        return outputs
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
