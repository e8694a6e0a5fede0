"""Crash recovery: every fedserve process is killed with SIGKILL in the middle of a round.

Participants pull their notifications and upload over HTTP. After each crash the
processes start again, and the training must go on: uploads made before the crash count,
the round switches exactly once, and every participant hears of each round once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from tests.e2e.cluster import (
    POSTGRES_URL,
    REDIS_URL,
    Account,
    Cluster,
    Feed,
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

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE_SIZES = [10, 20, 30, 40]
# Weighted mean of the offsets 1, 2, 3 and 4 that participants add to every weight.
MEAN_OFFSET = sum((i + 1) * size for i, size in enumerate(SAMPLE_SIZES)) / sum(SAMPLE_SIZES)


class Net(torch.nn.Module):
    """About half a million parameters, so that a crash can land inside an aggregation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 1024)
        self.fc2 = torch.nn.Linear(1024, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(params=["embedded", "production"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    if request.param == "embedded":
        embedded = Cluster(tmp_path / "data")
        embedded.start()
        try:
            yield embedded
        finally:
            embedded.stop()
        return

    if not (POSTGRES_URL and REDIS_URL):
        pytest.skip("production mode needs FEDSERVE_TEST_POSTGRES and FEDSERVE_TEST_REDIS")
    with fresh_postgres_database() as database_url, redis_queue() as queue_name:
        production = Cluster(
            tmp_path / "data",
            workers=1,
            database_url=database_url,
            broker_url=REDIS_URL,
            queue_name=queue_name,
        )
        production.migrate()
        production.start()
        try:
            yield production
        finally:
            production.stop()


def crash_and_restart(cluster: Cluster) -> None:
    cluster.kill()
    cluster.start()


def test_killed_processes_lose_no_round(cluster: Cluster) -> None:
    url = cluster.urls[0]
    actor = Account(url, "restart-actor", actor=True)
    participants = [Account(url, f"restart-participant-{i}", client=True) for i in range(4)]
    feeds = [Feed(participant) for participant in participants]
    torch.manual_seed(0)
    model_id = upload_model(url, actor, Net())
    training_id = create_training(url, actor, model_id, participants, target_num_updates=1)
    model_id = training_model_id(url, actor, training_id)
    start_training(url, actor, training_id)
    for feed in feeds:
        feed.wait_for(url, "UPDATE_ROUND_START", round=0)
    base = download_state(url, participants[0], model_id)

    def send_update(i: int) -> None:
        update = {key: value + (i + 1) for key, value in base.items()}
        response = upload_update(url, participants[i], model_id, 0, update, SAMPLE_SIZES[i])
        assert response.status_code == 201, response.text

    # Half of the updates, then a crash while the round waits for the rest.
    send_update(0)
    send_update(1)
    crash_and_restart(cluster)

    # The rest, then a crash at once: the round switch is queued, claimed or half done.
    send_update(2)
    send_update(3)
    crash_and_restart(cluster)

    for feed in feeds:
        feed.wait_for(url, "MODEL_TEST_ROUND", round=1)
    aggregated = download_state(url, participants[0], model_id)
    for key, value in aggregated.items():
        assert torch.allclose(value, base[key] + MEAN_OFFSET, atol=1e-5), key
    for i, participant in enumerate(participants):
        upload_metrics(url, participant, model_id, 0.5 + i / 10)

    for feed in feeds:
        feed.wait_for(url, "TRAINING_FINISHED")
    training = requests.get(
        f"{url}/api/trainings/{training_id}/", headers=actor.headers, timeout=30
    ).json()
    assert training["state"] == "C"
    for feed in feeds:
        feed.pull(url, wait=0)
        assert feed.count("TRAINING_START") == 1
        assert feed.count("UPDATE_ROUND_START", round=0) == 1
        assert feed.count("MODEL_TEST_ROUND", round=1) == 1
        assert feed.count("TRAINING_FINISHED") == 1
        assert len(feed.seen) == 4
