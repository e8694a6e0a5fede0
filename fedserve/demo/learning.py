"""The demo's model and the training and evaluation code shared by all its parties."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedserve.demo.data import NUM_CLASSES, NUM_FEATURES
from fedserve.demo.settings import TrainingSettings


class DigitsNet(nn.Module):
    """A classifier of 8x8 digit images (flattened to 64 pixels) with dropout for MC dropout."""

    def __init__(self, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


def build_model(seed: int) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    scripted: torch.jit.ScriptModule = torch.jit.script(DigitsNet())
    return scripted


def train_epochs(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    settings: TrainingSettings,
    *,
    seed: int,
    epochs: int | None = None,
) -> float:
    """Train in place with mini-batch SGD; return the mean loss of the last epoch.

    With `settings.mu` > 0 the loss gets FedProx's proximal term mu/2 * ||w - w_start||^2,
    which keeps the local model near the global model it started from.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(features)
    y = torch.from_numpy(labels)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
    )
    start = [p.detach().clone() for p in model.parameters()]
    loss_function = nn.CrossEntropyLoss()

    model.train()
    last_epoch_loss = 0.0
    for _ in range(settings.epochs if epochs is None else epochs):
        order = torch.randperm(len(x), generator=generator)
        total, count = 0.0, 0
        for begin in range(0, len(x), settings.batch_size):
            batch = order[begin : begin + settings.batch_size]
            optimizer.zero_grad()
            loss = loss_function(model(x[batch]), y[batch])
            if settings.mu > 0:
                proximal = sum(
                    ((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start, strict=True)
                )
                loss = loss + settings.mu / 2 * proximal
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        last_epoch_loss = total / max(count, 1)
    return last_epoch_loss


@torch.no_grad()
def evaluate(model: nn.Module, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Return accuracy and mean cross-entropy loss with dropout off."""
    model.eval()
    logits = model(torch.from_numpy(features))
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    accuracy = (logits.argmax(dim=1).numpy() == labels).mean()
    return {"accuracy": float(accuracy), "loss": float(loss)}


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def swag_moments(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    settings: TrainingSettings,
    *,
    seed: int,
    snapshots: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect SWAG moments: continue training and average the parameters over snapshots.

    Returns the mean and the mean of squares of the flattened parameters, taken after
    each of `snapshots` further epochs.
    """
    first = torch.zeros_like(flat_parameters(model))
    second = torch.zeros_like(first)
    for index in range(snapshots):
        train_epochs(model, features, labels, settings, seed=seed + index, epochs=1)
        flat = flat_parameters(model)
        first += flat / snapshots
        second += flat**2 / snapshots
    return first, second
