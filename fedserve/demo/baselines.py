"""Reference points for the federated result: centralised training and training alone."""

from __future__ import annotations

from fedserve.demo.data import DemoData
from fedserve.demo.learning import build_model, evaluate, train_epochs
from fedserve.demo.settings import TrainingSettings


def centralized_accuracy(
    data: DemoData, settings: TrainingSettings, *, seed: int, epochs: int
) -> float:
    """Train the same model on all participants' training data pooled, for `epochs` epochs."""
    model = build_model(seed)
    train_epochs(model, data.pooled_x, data.pooled_y, settings, seed=seed, epochs=epochs)
    return evaluate(model, data.test_x, data.test_y)["accuracy"]


def local_accuracies(
    data: DemoData, settings: TrainingSettings, *, seed: int, epochs: int
) -> list[float]:
    """Train the model on each participant's shard alone, for `epochs` epochs each."""
    accuracies = []
    for index, shard in enumerate(data.shards):
        model = build_model(seed)
        train_epochs(
            model, shard.train_x, shard.train_y, settings, seed=seed + index, epochs=epochs
        )
        accuracies.append(evaluate(model, data.test_x, data.test_y)["accuracy"])
    return accuracies
