"""The end-to-end demo: a federated training on scikit-learn's digits over real HTTP.

`fedserve demo` starts a fedserve server on the embedded default, registers an actor and
participants, and runs each participant as its own process with the participant SDK.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fedserve.client import FedserveError
from fedserve.demo.processes import DemoError
from fedserve.demo.settings import DemoSettings

AGGREGATIONS = ("FedAvg", "FedProx", "FedDC")
UNCERTAINTIES = ("NONE", "MC_DROPOUT", "ENSEMBLE", "SWAG")


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="fedserve demo",
        description=(
            "Run a federated training of a digit classifier end to end: a fedserve server, an "
            "actor and participant processes on 127.0.0.1, then compare with centralised and "
            "local training and predict with uncertainty."
        ),
    )
    parser.add_argument(
        "--participants",
        type=int,
        default=defaults.participants,
        help="number of participant processes (default %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="aggregation rounds, the training's target_num_updates (default %(default)s)",
    )
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=defaults.aggregation,
        help="aggregation method (default %(default)s)",
    )
    parser.add_argument(
        "--uncertainty",
        choices=UNCERTAINTIES,
        default=defaults.uncertainty,
        help="uncertainty method for inference (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the data split, the model and local training (default %(default)s)",
    )
    parser.add_argument(
        "--mode",
        choices=("poll", "webhook", "mixed"),
        default=defaults.mode,
        help=(
            "how participants get notifications: long polling, webhooks, or alternating "
            "(default %(default)s)"
        ),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("fedserve-demo"),
        help="folder for report.json, the plot and the logs (default ./%(default)s)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="server port on 127.0.0.1 (default: a free port)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="local epochs per round (default %(default)s)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help="SGD learning rate (default %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help=(
            "Dirichlet concentration of the label split; smaller is less balanced "
            "(default %(default)s)"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds the training may take before the demo gives up (default %(default)s)",
    )
    return parser


def main(arguments: list[str]) -> None:
    """Run the demo; exit with a message and status 1 when it fails."""
    args = build_parser().parse_args(arguments)
    if args.participants < 2:
        raise SystemExit(f"--participants must be at least 2, not {args.participants}.")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, not {args.rounds}.")
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, not {args.epochs}.")
    if args.alpha <= 0:
        raise SystemExit(f"--alpha must be greater than 0, not {args.alpha}.")

    # The demo prints its own progress; the SDK's and libraries' INFO lines go to the logs.
    logging.getLogger().setLevel(os.environ.get("FEDSERVE_DEMO_LOG_LEVEL", "WARNING"))
    settings = DemoSettings(
        participants=args.participants,
        rounds=args.rounds,
        aggregation=args.aggregation,
        uncertainty=args.uncertainty,
        seed=args.seed,
        mode=args.mode,
        output=args.output,
        port=args.port,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        alpha=args.alpha,
        timeout=args.timeout,
    )
    # The runner loads PyTorch, which takes seconds, so it is imported after the checks.
    from fedserve.demo.runner import run_demo

    try:
        run_demo(settings)
    except (DemoError, FedserveError, ValueError, OSError) as exc:
        raise SystemExit(f"fedserve demo failed: {exc}") from exc
    except KeyboardInterrupt:
        raise SystemExit(
            "fedserve demo interrupted; the server and participants were stopped."
        ) from None
