"""Production mode end to end: PostgreSQL, Redis, two API servers and two Celery workers.

Participants talk plain HTTP to both servers: five receive webhooks on 127.0.0.1, one
pulls its notifications with long polling. A second test races the last two uploads of
30 rounds against the two servers and checks that each round aggregates once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.e2e.cluster import (
    POSTGRES_URL,
    REDIS_URL,
    Account,
    Cluster,
    Feed,
    Receiver,
    create_training,
    download_state,
    fresh_postgres_database,
    redis_queue,
    start_training,
    training_model_id,
    upload_metrics,
    upload_model,
    upload_update,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.skipif(
        not (POSTGRES_URL and REDIS_URL),
        reason="production mode needs FEDSERVE_TEST_POSTGRES and FEDSERVE_TEST_REDIS",
    ),
]

ROUNDS = 2
RACES = 30


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with fresh_postgres_database() as database_url, redis_queue() as queue_name:
        production = Cluster(
            Path(tmp_path_factory.mktemp("production")),
            servers=2,
            workers=2,
            database_url=database_url,
            broker_url=REDIS_URL,
            queue_name=queue_name,
            environment={"FEDSERVE_WEBHOOK_BACKOFF_SECONDS": "1"},
        )
        production.migrate()
        production.start()
        try:
            yield production
        finally:
            production.stop()


class Participant:
    """Trains by adding `offset` to every weight; reacts to webhooks or to pulled messages."""

    def __init__(self, account: Account, url: str, offset: float, sample_size: int) -> None:
        self.account = account
        self.url = url
        self.offset = offset
        self.sample_size = sample_size
        self.errors: list[BaseException] = []
        self.handled: list[tuple[str, Any]] = []

    def handle(self, message: dict[str, Any]) -> bool:
        """Act on one notification; return True once the training has finished."""
        kind, body = message["notification_type"], message["body"]
        self.handled.append((kind, body.get("round")))
        if kind == "UPDATE_ROUND_START":
            state = download_state(self.url, self.account, body["global_model_uuid"])
            update = {key: value + self.offset for key, value in state.items()}
            response = upload_update(
                self.url,
                self.account,
                body["global_model_uuid"],
                body["round"],
                update,
                self.sample_size,
            )
            assert response.status_code == 201, response.text
        elif kind == "MODEL_TEST_ROUND":
            upload_metrics(self.url, self.account, body["global_model_uuid"], 0.9)
        return bool(kind == "TRAINING_FINISHED")

    def follow_webhooks(self, receiver: Receiver) -> None:
        try:
            while not self.handle(receiver.inbox.get(timeout=90)):
                pass
        except BaseException as error:
            self.errors.append(error)

    def follow_feed(self, feed: Feed) -> None:
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                for message in feed.pull(self.url, wait=10):
                    if self.handle(message):
                        return
            raise AssertionError("the training did not finish within 90 s")
        except BaseException as error:
            self.errors.append(error)


def test_full_training_over_two_servers_and_workers(cluster: Cluster) -> None:
    urls = cluster.urls
    actor = Account(urls[0], "production-actor", actor=True)
    receivers = [Receiver() for _ in range(5)]
    accounts = [
        Account(urls[i % 2], f"production-webhook-{i}", client=True, message_endpoint=r.url)
        for i, r in enumerate(receivers)
    ]
    accounts.append(Account(urls[1], "production-puller", client=True))
    offsets = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    sample_sizes = [10, 20, 30, 40, 50, 60]
    participants = [
        Participant(account, urls[i % 2], offsets[i], sample_sizes[i])
        for i, account in enumerate(accounts)
    ]
    feed = Feed(accounts[-1])
    actor_feed = Feed(actor)

    torch.manual_seed(1)
    model_id = upload_model(urls[0], actor, Net())
    training_id = create_training(urls[0], actor, model_id, accounts, target_num_updates=ROUNDS)
    model_id = training_model_id(urls[0], actor, training_id)
    initial = download_state(urls[0], actor, model_id)
    threads = [
        threading.Thread(target=participant.follow_webhooks, args=(receiver,))
        for participant, receiver in zip(participants, receivers, strict=False)
    ]
    threads.append(threading.Thread(target=participants[-1].follow_feed, args=(feed,)))
    for thread in threads:
        thread.start()
    try:
        start_training(urls[1], actor, training_id)
        for thread in threads:
            thread.join(120)
    finally:
        for receiver in receivers:
            receiver.close()

    for participant in participants:
        assert participant.errors == []
    training = requests.get(
        f"{urls[1]}/api/trainings/{training_id}/", headers=actor.headers, timeout=30
    ).json()
    assert training["state"] == "C"

    mean_offset = sum(o * s for o, s in zip(offsets, sample_sizes, strict=True)) / sum(sample_sizes)
    final = download_state(urls[1], actor, model_id)
    for key, value in final.items():
        assert torch.allclose(value, initial[key] + ROUNDS * mean_offset, atol=1e-5), key

    expected = [
        ("TRAINING_START", None),
        ("UPDATE_ROUND_START", 0),
        ("MODEL_TEST_ROUND", 1),
        ("UPDATE_ROUND_START", 1),
        ("MODEL_TEST_ROUND", 2),
        ("TRAINING_FINISHED", None),
    ]
    for participant in participants:
        assert participant.handled == expected
    for receiver in receivers:
        assert len(receiver.received) == len(expected)
    actor_feed.wait_for(urls[0], "TRAINING_FINISHED", global_model_uuid=model_id)
    assert cluster.aggregations(training_id) == ROUNDS


def race_upload(
    barrier: threading.Barrier,
    responses: list[requests.Response],
    url: str,
    account: Account,
    model_id: str,
    state: dict[str, torch.Tensor],
) -> None:
    """Upload a round-0 update as soon as the other racer is ready too."""
    barrier.wait()
    responses.append(upload_update(url, account, model_id, 0, state, 10))


def test_racing_uploads_on_two_servers_aggregate_once(cluster: Cluster) -> None:
    urls = cluster.urls
    actor = Account(urls[0], "race-actor", actor=True)
    accounts = [Account(urls[0], f"race-participant-{i}", client=True) for i in range(3)]
    feeds = [Feed(account) for account in accounts]
    source_model = upload_model(urls[0], actor, Net())

    # Every training waits for the last two of three updates.
    def prepare(index: int) -> tuple[str, str]:
        url = urls[index % 2]
        training_id = create_training(url, actor, source_model, accounts)
        model_id = training_model_id(url, actor, training_id)
        start_training(url, actor, training_id)
        return training_id, model_id

    with ThreadPoolExecutor(max_workers=4) as pool:
        trainings = list(pool.map(prepare, range(RACES)))
    state = download_state(urls[0], actor, trainings[0][1])

    def first_update(model_id: str) -> int:
        return upload_update(urls[1], accounts[0], model_id, 0, state, 10).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert set(pool.map(first_update, [model_id for _, model_id in trainings])) == {201}

    # Each pair of final uploads starts together, one on each server.
    for _training_id, model_id in trainings:
        responses: list[requests.Response] = []
        barrier = threading.Barrier(2)
        racers = [
            threading.Thread(
                target=race_upload,
                args=(barrier, responses, urls[index - 1], accounts[index], model_id, state),
            )
            for index in (1, 2)
        ]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(60)
        assert [r.status_code for r in responses] == [201, 201], [r.text for r in responses]

    for feed in feeds:
        deadline = time.monotonic() + 90
        while feed.count("MODEL_TEST_ROUND", round=1) < RACES and time.monotonic() < deadline:
            feed.pull(urls[1], wait=5)
    for training_id, _model_id in trainings:
        for feed in feeds:
            tests = [
                message
                for message in feed.seen
                if message["notification_type"] == "MODEL_TEST_ROUND"
                and message["training_uuid"] == training_id
            ]
            assert len(tests) == 1, (training_id, feed.participant.id, tests)
        assert cluster.aggregations(training_id) == 1, training_id
