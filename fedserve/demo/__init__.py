"""The end-to-end demo: a federated training on scikit-learn's digits over real HTTP."""

from __future__ import annotations


def main(arguments: list[str]) -> None:
    raise SystemExit("fedserve demo is not built yet.")
