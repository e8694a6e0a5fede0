"""One demo participant as its own process: `python -m fedserve.demo.participant ...`.

It reads its data shard from a file and takes part in one training through the SDK
until the training finishes. The server URL, the training id and the API token come from
`--url`, `--training` and the FEDSERVE_TOKEN environment variable, or, with `--assignment
-`, as one JSON line on standard input. The demo uses the second form to start the
processes (and their slow PyTorch import) while the server is still starting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from fedserve.client import Client, NotificationType, WebhookReceiver
from fedserve.demo.data import Shard
from fedserve.demo.learning import evaluate, swag_moments, train_epochs
from fedserve.demo.settings import TrainingSettings

logger = logging.getLogger("fedserve.demo.participant")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="server base URL, for example http://127.0.0.1:8000")
    parser.add_argument("--training", help="training id")
    parser.add_argument(
        "--assignment",
        choices=["-"],
        help='read {"url", "training", "token"} as one JSON line from standard input',
    )
    parser.add_argument("--shard", required=True, type=Path, help=".npz file of this shard")
    parser.add_argument("--index", type=int, required=True, help="participant number")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the demo")
    parser.add_argument("--mode", choices=["poll", "webhook"], default="poll")
    parser.add_argument("--webhook-port", type=int, default=0, help="port of the webhook receiver")
    parser.add_argument("--ready-file", type=Path, help="file to create once notifications flow")
    parser.add_argument("--epochs", type=int, default=TrainingSettings.epochs)
    parser.add_argument("--learning-rate", type=float, default=TrainingSettings.learning_rate)
    parser.add_argument(
        "--update-format", choices=["state_dict", "torchscript"], default="state_dict"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FEDSERVE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s participant-{args.index} %(message)s",
    )
    if args.assignment == "-":
        line = sys.stdin.readline()
        if not line:
            logger.info("no assignment arrived on standard input; exiting")
            return 0
        assignment = json.loads(line)
        url, training_id, token = assignment["url"], assignment["training"], assignment["token"]
    else:
        url, training_id, token = args.url, args.training, os.environ.get("FEDSERVE_TOKEN")
    if not (url and training_id and token):
        print(
            "Give --url, --training and the token in FEDSERVE_TOKEN, or --assignment -.",
            file=sys.stderr,
        )
        return 2

    # One thread per participant: the demo runs several on a small machine, and
    # single-threaded kernels give the same sums on every run.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    shard = Shard.load(args.shard)
    client = Client(url, token=token)
    training = client.get_training(training_id)
    options = training.get("options") or {}
    mu = float(options.get("mu", 0.01)) if training["aggregation_method"] == "FedProx" else 0.0
    settings = TrainingSettings(epochs=args.epochs, learning_rate=args.learning_rate, mu=mu)
    seed_base = args.seed * 1_000_003 + args.index * 10_007

    def train(model: torch.nn.Module, round_number: int) -> tuple[object, int, dict[str, float]]:
        torch.manual_seed(seed_base + round_number)
        loss = train_epochs(
            model, shard.train_x, shard.train_y, settings, seed=seed_base + round_number
        )
        return model, len(shard.train_y), {"train_loss": loss}

    def test(model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, shard.val_x, shard.val_y)

    def swag(model: torch.nn.Module, round_number: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        torch.manual_seed(seed_base + 7919 + round_number)
        first, second = swag_moments(
            model, shard.train_x, shard.train_y, settings, seed=seed_base + 7919 + round_number
        )
        return first, second, len(shard.train_y)

    receiver = None
    if args.mode == "webhook":
        receiver = WebhookReceiver("127.0.0.1", args.webhook_port).start()
    try:
        if args.ready_file is not None:
            args.ready_file.touch()
        ending = client.run(
            training_id,
            train=train,
            test=test,
            swag=swag,
            mode=args.mode,
            receiver=receiver,
            update_format=args.update_format,
        )
    finally:
        if receiver is not None:
            receiver.stop()
        client.close()
    if ending.type == NotificationType.CLIENT_REMOVED:
        logger.error("this participant was removed from training %s", training_id)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
