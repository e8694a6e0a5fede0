"""The participant loop against an in-process stand-in for the Client.

The stand-in scripts the feed and records uploads, so each delivery pattern (repeats,
backlogs, other trainings, stale rounds) is exact. tests/client/test_client_server.py
runs the same loop against a real server.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from fedserve.client import (
    ClientError,
    ConflictError,
    Notification,
    NotificationType,
    ServerError,
    TransportError,
    WebhookReceiver,
)
from fedserve.client._participant import Participant
from tests.factories import TinyNet

TRAINING = "aaaaaaaa-0000-0000-0000-000000000001"
OTHER = "bbbbbbbb-0000-0000-0000-000000000002"
GLOBAL = "cccccccc-0000-0000-0000-000000000003"
LOCAL = "dddddddd-0000-0000-0000-000000000004"


def _torchscript(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def note(
    kind: str,
    round_number: int | None = None,
    model: str = GLOBAL,
    training: str = TRAINING,
    sequence: int | None = None,
) -> Notification:
    body: dict[str, Any] = {"global_model_uuid": model}
    if round_number is not None:
        body["round"] = round_number
    return Notification.from_json(
        {"notification_type": kind, "training_uuid": training, "body": body}, sequence
    )


class StubClient:
    """Return scripted feed pages; a page that is an exception is raised instead."""

    def __init__(self, pages: list[Any], **training: Any) -> None:
        self.pages = pages
        self.training = {"id": TRAINING, "model": GLOBAL, "state": "O", "options": {}, **training}
        self.model_round = 0
        self.training_has_round = True
        self.files = {GLOBAL: _torchscript(TinyNet())}
        self.updates: list[tuple[str, int, int]] = []
        self.metrics: list[tuple[str, dict[str, Any]]] = []
        self.update_error: Exception | None = None
        # Raised by the next uploads of updates, one each, before `update_error` applies.
        self.update_failures: list[Exception] = []
        self.polls: list[tuple[int, float]] = []

    def get_training(self, training_id: str) -> dict[str, Any]:
        training = dict(self.training)
        if self.training_has_round:
            training["round"] = self.model_round
        return training

    def model_metadata(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "round": self.model_round}

    def notifications(self, *, after: int = 0, wait: float = 0) -> list[Notification]:
        self.polls.append((after, wait))
        if not self.pages:
            raise AssertionError("the loop polled after the training ended")
        page = self.pages.pop(0)
        if isinstance(page, Exception):
            raise page
        return list(page)

    def download_model(self, model_id: str) -> bytes:
        return self.files[model_id]

    def upload_update(
        self,
        model_id: str,
        update: Any,
        *,
        round: int,
        sample_size: int,
        metrics: Any,
        file_format: str,
    ) -> None:
        if self.update_failures:
            raise self.update_failures.pop(0)
        if self.update_error is not None:
            raise self.update_error
        self.updates.append((model_id, round, sample_size))

    def upload_metrics(self, model_id: str, metrics: dict[str, Any]) -> None:
        self.metrics.append((model_id, dict(metrics)))

    def myself(self) -> dict[str, Any]:
        return {"message_endpoint": ""}


def train(model: torch.nn.Module, round_number: int) -> tuple[Any, int, dict[str, float]]:
    return model.state_dict(), 12, {"loss": 0.5}


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    return {"accuracy": 0.75}


def run_poll(stub: StubClient, **callbacks: Any) -> Notification:
    callbacks.setdefault("train", train)
    callbacks.setdefault("test", evaluate)
    participant = Participant(stub, TRAINING, **callbacks)  # type: ignore[arg-type]
    return participant.run(mode="poll", poll_wait=1)


def test_full_training_uploads_each_round():
    stub = StubClient(
        [
            [note("TRAINING_START", sequence=1), note("UPDATE_ROUND_START", 0, sequence=2)],
            [],
            [note("MODEL_TEST_ROUND", 1, sequence=3)],
            [note("UPDATE_ROUND_START", 1, sequence=4)],
            [note("MODEL_TEST_ROUND", 2, sequence=5), note("TRAINING_FINISHED", sequence=6)],
        ]
    )
    stub.pages.insert(1, [])  # end of the stored backlog
    ending = run_poll(stub)
    assert ending.type is NotificationType.TRAINING_FINISHED
    assert stub.updates == [(GLOBAL, 0, 12), (GLOBAL, 1, 12)]
    assert stub.metrics == [(GLOBAL, {"accuracy": 0.75})]
    assert stub.polls[-1] == (4, 1)


def test_poll_cursor_advances_to_last_sequence():
    stub = StubClient(
        [
            [note("UPDATE_ROUND_START", 0, sequence=3)],
            [],
            [note("TRAINING_FINISHED", sequence=8)],
        ]
    )
    run_poll(stub)
    assert [after for after, _ in stub.polls] == [0, 3, 3]
    assert stub.polls[1][1] == 0
    assert stub.polls[2][1] == 1


def test_repeated_notification_handled_once():
    repeated = note("UPDATE_ROUND_START", 0, sequence=2)
    stub = StubClient(
        [
            [],
            [repeated],
            [note("UPDATE_ROUND_START", 0, sequence=3)],
            [note("TRAINING_FINISHED", sequence=4)],
        ]
    )
    run_poll(stub)
    assert stub.updates == [(GLOBAL, 0, 12)]


def test_backlog_collapses_to_newest_round():
    stub = StubClient(
        [
            [
                note("TRAINING_START", sequence=1),
                note("UPDATE_ROUND_START", 0, sequence=2),
                note("MODEL_TEST_ROUND", 1, sequence=3),
                note("UPDATE_ROUND_START", 1, sequence=4),
            ],
            [],
            [note("TRAINING_FINISHED", sequence=5)],
        ]
    )
    run_poll(stub)
    assert stub.updates == [(GLOBAL, 1, 12)]
    assert stub.metrics == []


def test_other_trainings_ignored():
    stub = StubClient(
        [
            [],
            [note("UPDATE_ROUND_START", 0, training=OTHER, sequence=1)],
            [note("TRAINING_FINISHED", training=OTHER, sequence=2)],
            [note("TRAINING_FINISHED", sequence=3)],
        ]
    )
    ending = run_poll(stub)
    assert ending.training_id == TRAINING
    assert stub.updates == []


def test_client_removed_ends_loop():
    stub = StubClient([[], [note("CLIENT_REMOVED", sequence=1)]])
    ending = run_poll(stub)
    assert ending.type is NotificationType.CLIENT_REMOVED


def test_conflict_on_upload_counts_as_done():
    stub = StubClient(
        [[], [note("UPDATE_ROUND_START", 0, sequence=1)], [note("TRAINING_FINISHED", sequence=2)]]
    )
    stub.update_error = ConflictError("already uploaded", status=409)
    ending = run_poll(stub)
    assert ending.type is NotificationType.TRAINING_FINISHED


def test_stale_round_rejection_skipped():
    stub = StubClient(
        [[], [note("UPDATE_ROUND_START", 0, sequence=1)], [note("TRAINING_FINISHED", sequence=2)]]
    )
    stub.model_round = 1
    stub.update_error = ClientError("round 0 is over", status=400)
    ending = run_poll(stub)
    assert ending.type is NotificationType.TRAINING_FINISHED


def test_stale_round_found_in_metadata():
    stub = StubClient(
        [[], [note("UPDATE_ROUND_START", 0, sequence=1)], [note("TRAINING_FINISHED", sequence=2)]]
    )
    stub.training_has_round = False
    stub.model_round = 1
    stub.update_error = ClientError("round 0 is over", status=400)
    ending = run_poll(stub)
    assert ending.type is NotificationType.TRAINING_FINISHED


def test_current_round_rejection_raises():
    stub = StubClient([[], [note("UPDATE_ROUND_START", 0, sequence=1)]])
    stub.update_error = ClientError("model_file: not a model", status=400)
    with pytest.raises(ClientError, match="not a model"):
        run_poll(stub)


def test_missing_test_callback_rejected_before_start():
    stub = StubClient([])
    with pytest.raises(ValueError, match="pass test="):
        run_poll(stub, test=None)


def test_missing_test_callback_allowed_when_tests_skipped():
    stub = StubClient(
        [[], [note("TRAINING_FINISHED", sequence=1)]], options={"skip_model_tests": True}
    )
    assert run_poll(stub, test=None).type is NotificationType.TRAINING_FINISHED


def test_missing_swag_callback_rejected_for_swag_training():
    stub = StubClient([], uncertainty_method="SWAG")
    with pytest.raises(ValueError, match="pass swag="):
        run_poll(stub)


def test_daisy_chained_weights_load_into_global_architecture():
    peer = TinyNet()
    buffer = io.BytesIO()
    torch.save(peer.state_dict(), buffer)
    stub = StubClient(
        [
            [],
            [note("UPDATE_ROUND_START", 1, model=LOCAL, sequence=1)],
            [note("TRAINING_FINISHED", sequence=2)],
        ]
    )
    stub.files[LOCAL] = buffer.getvalue()
    received: list[torch.Tensor] = []

    def train_peer(model: torch.nn.Module, round_number: int) -> tuple[Any, int, dict[str, float]]:
        received.append(model.state_dict()["fc1.weight"].clone())
        return model, 5, {}

    run_poll(stub, train=train_peer)
    assert torch.equal(received[0], peer.fc1.weight)
    assert stub.updates == [(GLOBAL, 1, 5)]


def test_webhook_mode_reads_receiver_queue():
    stub = StubClient([])
    with WebhookReceiver() as receiver:

        def train_then_finish(model: torch.nn.Module, round_number: int) -> Any:
            receiver.queue.put(note("UPDATE_ROUND_START", 0))
            receiver.queue.put(note("TRAINING_FINISHED"))
            return train(model, round_number)

        receiver.queue.put(note("UPDATE_ROUND_START", 0))
        participant = Participant(stub, TRAINING, train=train_then_finish, test=evaluate)  # type: ignore[arg-type]
        ending = participant.run(mode="webhook", receiver=receiver)
    assert ending.type is NotificationType.TRAINING_FINISHED
    assert stub.updates == [(GLOBAL, 0, 12)]


def test_finished_in_same_batch_skips_work():
    stub = StubClient([])
    with WebhookReceiver() as receiver:
        receiver.queue.put(note("UPDATE_ROUND_START", 3))
        receiver.queue.put(note("TRAINING_FINISHED"))
        participant = Participant(stub, TRAINING, train=train, test=evaluate)  # type: ignore[arg-type]
        ending = participant.run(mode="webhook", receiver=receiver)
    assert ending.type is NotificationType.TRAINING_FINISHED
    assert stub.updates == []


def test_webhook_idle_timeout():
    stub = StubClient([])
    with WebhookReceiver() as receiver:
        participant = Participant(stub, TRAINING, train=train, test=evaluate)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError, match="No notification"):
            participant.run(mode="webhook", receiver=receiver, idle_timeout=0.2)


def test_unknown_mode_rejected():
    participant = Participant(StubClient([]), TRAINING, train=train, test=evaluate)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be"):
        participant.run(mode="push")


# Transient failures after the transport's retries


UNREACHABLE = TransportError("POST failed after 5 attempts", method="POST", url="u")
UNAVAILABLE = ServerError("busy", status=503, method="POST", url="u")


class CountingTrain:
    def __init__(self) -> None:
        self.rounds: list[int] = []

    def __call__(self, model: torch.nn.Module, round_number: int) -> Any:
        self.rounds.append(round_number)
        return train(model, round_number)


def run_with_retries(stub: StubClient, counting_train: CountingTrain) -> Notification:
    participant = Participant(stub, TRAINING, train=counting_train, test=evaluate)  # type: ignore[arg-type]
    return participant.run(mode="poll", poll_wait=1, retry_wait=0.01)


def test_failed_upload_sent_again_without_training():
    stub = StubClient(
        [
            [],
            [note("UPDATE_ROUND_START", 0, sequence=1)],
            [],
            [],
            [note("TRAINING_FINISHED", sequence=2)],
        ]
    )
    stub.update_failures = [UNREACHABLE, UNAVAILABLE]
    counting_train = CountingTrain()
    ending = run_with_retries(stub, counting_train)
    assert ending.type is NotificationType.TRAINING_FINISHED
    assert stub.updates == [(GLOBAL, 0, 12)]
    assert counting_train.rounds == [0]
    # After a failure the loop polls with the retry wait, not the poll wait.
    assert stub.polls[2:] == [(1, 0.01), (1, 0.01), (1, 1)]


def test_failed_upload_logged(caplog):
    stub = StubClient(
        [
            [],
            [note("UPDATE_ROUND_START", 0, sequence=1)],
            [],
            [note("TRAINING_FINISHED", sequence=2)],
        ]
    )
    stub.update_failures = [UNREACHABLE]
    with caplog.at_level("ERROR", logger="fedserve.client"):
        run_with_retries(stub, CountingTrain())
    assert f"training {TRAINING}: UPDATE_ROUND_START for round 0 failed" in caplog.text
    assert "POST failed after 5 attempts" in caplog.text


def test_failed_upload_superseded_by_newer_round():
    stub = StubClient(
        [
            [],
            [note("UPDATE_ROUND_START", 0, sequence=1)],
            [note("UPDATE_ROUND_START", 1, sequence=2)],
            [note("TRAINING_FINISHED", sequence=3)],
        ]
    )
    stub.update_failures = [UNREACHABLE]
    counting_train = CountingTrain()
    run_with_retries(stub, counting_train)
    assert stub.updates == [(GLOBAL, 1, 12)]
    assert counting_train.rounds == [0, 1]


def test_failed_feed_read_polled_again():
    stub = StubClient(
        [
            [],
            UNREACHABLE,
            [note("UPDATE_ROUND_START", 0, sequence=1)],
            UNAVAILABLE,
            [note("TRAINING_FINISHED", sequence=2)],
        ]
    )
    ending = run_with_retries(stub, CountingTrain())
    assert ending.type is NotificationType.TRAINING_FINISHED
    assert stub.updates == [(GLOBAL, 0, 12)]
    assert [after for after, _ in stub.polls] == [0, 0, 0, 1, 1]


def test_non_transient_upload_error_still_raises():
    stub = StubClient([[], [note("UPDATE_ROUND_START", 0, sequence=1)], []])
    stub.update_failures = [UNREACHABLE]
    stub.update_error = ClientError("model_file: not a model", status=400)
    with pytest.raises(ClientError, match="not a model"):
        run_with_retries(stub, CountingTrain())


def test_webhook_mode_retries_failed_upload():
    stub = StubClient([])
    stub.update_failures = [UNREACHABLE]
    with WebhookReceiver() as receiver:
        original_upload = stub.upload_update

        def upload_then_finish(*args: Any, **kwargs: Any) -> None:
            original_upload(*args, **kwargs)
            receiver.queue.put(note("TRAINING_FINISHED"))

        stub.upload_update = upload_then_finish  # type: ignore[method-assign]
        receiver.queue.put(note("UPDATE_ROUND_START", 0))
        participant = Participant(stub, TRAINING, train=train, test=evaluate)  # type: ignore[arg-type]
        ending = participant.run(mode="webhook", receiver=receiver, retry_wait=0.01)
    assert ending.type is NotificationType.TRAINING_FINISHED
    assert stub.updates == [(GLOBAL, 0, 12)]


def test_retry_wait_must_be_positive():
    participant = Participant(StubClient([]), TRAINING, train=train, test=evaluate)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_wait must be a positive number"):
        participant.run(retry_wait=0)
