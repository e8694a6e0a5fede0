"""The SDK against a real `fedserve serve` process on 127.0.0.1."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedserve.client import (
    AuthenticationError,
    Client,
    ClientError,
    ConflictError,
    NotFoundError,
    NotificationType,
    PermissionDeniedError,
)
from tests.client.server import running_server
from tests.factories import TinyNet

pytestmark = [pytest.mark.e2e]

PASSWORD = "a long password 1"
_names = itertools.count()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(Path(tmp_path_factory.mktemp("sdk-server"))) as url:
        yield url


def register(url: str, **fields: Any) -> Client:
    return Client.register(url, f"sdk-user-{next(_names)}", PASSWORD, **fields)


def make_callbacks(seed: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=generator)
    y = torch.randint(0, 3, (32,), generator=generator)

    def train(model: torch.nn.Module, round_number: int) -> tuple[Any, int, dict[str, float]]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return model, len(x), {"train_loss": loss.item()}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return {"accuracy": (model(x).argmax(dim=1) == y).float().mean().item()}

    return train, evaluate


def swag(model: torch.nn.Module, round_number: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return flat, flat**2, 32


def run_training(
    url: str,
    *,
    rounds: int = 2,
    aggregation: str = "FedAvg",
    uncertainty: str = "NONE",
    options: dict[str, Any] | None = None,
    formats: tuple[str, str] = ("state_dict", "state_dict"),
) -> tuple[Client, str, str, list[Any], list[Client]]:
    """Run a whole training with two SDK participants in threads; return the outcome."""
    actor = register(url, actor=True, client=False)
    participants = [register(url) for _ in range(2)]
    model_id = actor.upload_model(TinyNet(), name="tiny", input_shape=[None, 4])
    training_id = actor.create_training(
        model_id,
        clients=[p.myself()["id"] for p in participants],
        target_num_updates=rounds,
        aggregation_method=aggregation,
        uncertainty_method=uncertainty,
        metric_names=["accuracy"],
        options=options,
    )
    endings: list[Any] = [None, None]

    def follow(index: int) -> None:
        train, evaluate = make_callbacks(index)
        try:
            endings[index] = participants[index].run(
                training_id,
                train=train,
                test=evaluate,
                swag=swag,
                poll_wait=5,
                update_format=formats[index],
                idle_timeout=60,
            )
        except BaseException as exc:  # The test asserts on the stored outcome.
            endings[index] = exc

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    actor.start_training(training_id)
    for thread in threads:
        thread.join(120)
    return actor, training_id, model_id, endings, participants


def test_register_returns_token_client(server_url: str) -> None:
    client = register(server_url, message_endpoint="")
    me = client.myself()
    assert client.token == me["token"]
    assert me["username"].startswith("sdk-user-")
    assert client.get_user(me["id"])["id"] == me["id"]


def test_duplicate_username_error_has_status_and_message(server_url: str) -> None:
    Client.register(server_url, "sdk-duplicate", PASSWORD)
    with pytest.raises(ClientError) as caught:
        Client.register(server_url, "sdk-duplicate", PASSWORD)
    assert caught.value.status == 400
    assert "username" in caught.value.message.lower()


def test_wrong_token_raises_authentication_error(server_url: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        Client(server_url, token="0" * 40).myself()
    assert caught.value.status == 401
    assert caught.value.message


def test_basic_auth_with_password(server_url: str) -> None:
    client = register(server_url)
    username = client.myself()["username"]
    assert Client(server_url, username=username, password=PASSWORD).myself()["username"] == username


def test_unknown_training_raises_not_found(server_url: str) -> None:
    client = register(server_url)
    with pytest.raises(NotFoundError) as caught:
        client.get_training("00000000-0000-4000-8000-000000000000")
    assert caught.value.status == 404


def test_foreign_training_start_rejected(server_url: str) -> None:
    actor = register(server_url, actor=True)
    other = register(server_url, actor=True)
    model_id = actor.upload_model(TinyNet(), name="tiny")
    training_id = actor.create_training(
        model_id, clients=[other.myself()["id"]], target_num_updates=1
    )
    with pytest.raises((PermissionDeniedError, NotFoundError)) as caught:
        other.start_training(training_id)
    assert caught.value.status in (403, 404)


def test_update_twice_raises_conflict(server_url: str) -> None:
    actor = register(server_url, actor=True)
    participant = register(server_url)
    model_id = actor.upload_model(TinyNet(), name="tiny", input_shape=[None, 4])
    other = register(server_url)
    training_id = actor.create_training(
        model_id,
        clients=[participant.myself()["id"], other.myself()["id"]],
        target_num_updates=1,
    )
    actor.start_training(training_id)
    model = participant.load_model(model_id)
    participant.upload_update(model_id, model, round=0, sample_size=3, metrics={"loss": 1.5})
    with pytest.raises(ConflictError) as caught:
        participant.upload_update(model_id, model, round=0, sample_size=3)
    assert caught.value.status == 409
    assert caught.value.message


def test_broken_update_file_rejected_with_message(server_url: str) -> None:
    actor = register(server_url, actor=True)
    participant = register(server_url)
    model_id = actor.upload_model(TinyNet(), name="tiny")
    training_id = actor.create_training(
        model_id, clients=[participant.myself()["id"]], target_num_updates=1
    )
    actor.start_training(training_id)
    wrong_shapes = {"fc1.weight": torch.zeros(2, 2)}
    with pytest.raises(ClientError) as caught:
        participant.upload_update(model_id, wrong_shapes, round=0, sample_size=3)
    assert caught.value.status == 400
    assert "fc1" in caught.value.message


def test_run_completes_fedavg_training(server_url: str) -> None:
    actor, training_id, model_id, endings, _ = run_training(
        server_url, formats=("state_dict", "torchscript")
    )
    for ending in endings:
        assert not isinstance(ending, BaseException), ending
        assert ending.type is NotificationType.TRAINING_FINISHED
    training = actor.get_training(training_id)
    assert training["state"] == "C"
    assert actor.model_metadata(model_id)["round"] == 2
    steps = sorted(m["step"] for m in actor.model_metrics(model_id) if m.get("key") == "accuracy")
    assert steps == [1, 1, 2, 2]
    assert isinstance(actor.load_model(model_id), torch.jit.ScriptModule)


def test_run_completes_swag_training(server_url: str) -> None:
    actor, training_id, _, endings, _ = run_training(server_url, rounds=1, uncertainty="SWAG")
    for ending in endings:
        assert not isinstance(ending, BaseException), ending
        assert ending.type is NotificationType.TRAINING_FINISHED
    assert actor.get_training(training_id)["state"] == "C"


def test_run_completes_feddc_training(server_url: str) -> None:
    actor, training_id, _, endings, _ = run_training(
        server_url, rounds=1, aggregation="FedDC", options={"daisy_chain_period": 2}
    )
    for ending in endings:
        assert not isinstance(ending, BaseException), ending
        assert ending.type is NotificationType.TRAINING_FINISHED
    assert actor.get_training(training_id)["state"] == "C"


def test_notifications_feed_follows_life_cycle(server_url: str) -> None:
    actor, training_id, model_id, _, participants = run_training(server_url, rounds=1)
    feed = participants[0].notifications(after=0, wait=0)
    ours = [(n.type, n.round) for n in feed if n.training_id == training_id]
    assert ours == [
        (NotificationType.TRAINING_START, None),
        (NotificationType.UPDATE_ROUND_START, 0),
        (NotificationType.MODEL_TEST_ROUND, 1),
        (NotificationType.TRAINING_FINISHED, None),
    ]
    assert all(n.sequence is not None for n in feed)
    assert participants[0].notifications(after=feed[-1].sequence or 0, wait=0) == []
    finished = actor.notifications(after=0, wait=0)
    assert [n.type for n in finished] == [NotificationType.TRAINING_FINISHED]
    assert finished[0].model_id == model_id


def test_docs_example_runs(server_url: str, tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs" / "client.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://127.0.0.1:8000", server_url))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "C"
