"""The demo's data: scikit-learn's handwritten digits, split across participants non-IID."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
NUM_FEATURES = 64


@dataclasses.dataclass(frozen=True)
class Shard:
    """One participant's data: a training split and a validation split for test rounds."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(
            path, train_x=self.train_x, train_y=self.train_y, val_x=self.val_x, val_y=self.val_y
        )

    @classmethod
    def load(cls, path: Path) -> Shard:
        with np.load(path, allow_pickle=False) as arrays:
            return cls(
                train_x=arrays["train_x"],
                train_y=arrays["train_y"],
                val_x=arrays["val_x"],
                val_y=arrays["val_y"],
            )


@dataclasses.dataclass(frozen=True)
class DemoData:
    shards: list[Shard]
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def pooled_x(self) -> np.ndarray:
        """The training splits of all participants together, for the centralised baseline."""
        return np.concatenate([shard.train_x for shard in self.shards])

    @property
    def pooled_y(self) -> np.ndarray:
        return np.concatenate([shard.train_y for shard in self.shards])


def load_digits_scaled() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1797 digit images as float32 rows of 64 pixels in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts from 0 to 16 (4x4 blocks of a 32x32 bitmap).
    features = (digits.data / 16.0).astype(np.float32)
    return features, digits.target.astype(np.int64)


def dirichlet_partition(
    labels: np.ndarray, num_parts: int, *, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    """Split sample indices into parts whose label mix follows Dirichlet(alpha) per class.

    A small alpha gives each part few classes (strongly non-IID). Draws repeat until every
    part has at least `min_size` samples, so every participant gets data.
    """
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for label in np.unique(labels):
            indices = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
            for part, chunk in zip(parts, np.split(indices, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [np.array(sorted(part), dtype=np.int64) for part in parts]
    raise ValueError(
        f"Could not give each of {num_parts} participants {min_size} samples with "
        f"alpha={alpha}; use fewer participants or a larger alpha."
    )


def make_demo_data(
    *,
    participants: int,
    seed: int,
    alpha: float,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.2,
) -> DemoData:
    """Hold out a stratified test set, then split the rest across participants."""
    from sklearn.model_selection import train_test_split

    features, labels = load_digits_scaled()
    rest_x, test_x, rest_y, test_y = train_test_split(
        features, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    rng = np.random.default_rng(seed)
    parts = dirichlet_partition(rest_y, participants, alpha=alpha, rng=rng, min_size=20)

    shards = []
    for indices in parts:
        indices = rng.permutation(indices)
        num_val = max(1, round(len(indices) * validation_fraction))
        val, train = indices[:num_val], indices[num_val:]
        shards.append(Shard(rest_x[train], rest_y[train], rest_x[val], rest_y[val]))
    return DemoData(shards=shards, test_x=test_x, test_y=test_y)
