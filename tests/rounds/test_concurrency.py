"""Racing triggers: the last deliveries of a phase arrive at the same time, 30 times over.

Each race runs the final uploads on separate threads, each with its own database
connection, next to a thread running the sweep. Exactly one aggregation may happen and
every participant must receive exactly one notification for what follows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import pytest
from django.db import connection

from fedserve.core.models import Notification, RoundPhase, Training
from fedserve.rounds import deadlines
from tests.factories import make_user
from tests.rounds.conftest import (
    fresh,
    started_training,
    upload_metrics,
    upload_swag,
    upload_update,
)

pytestmark = pytest.mark.usefixtures("lifecycle")

RACES = 30


def race(actions: list[Callable[[], None]]) -> None:
    """Run the actions on threads released together; re-raise the first failure."""
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Callable[[], None]) -> None:
        try:
            barrier.wait()
            action()
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def count_notifications(training: Training, notification_type: str) -> dict[object, int]:
    counts: dict[object, int] = {}
    for recipient_id in Notification.objects.filter(
        training=training, notification_type=notification_type
    ).values_list("recipient_id", flat=True):
        counts[recipient_id] = counts.get(recipient_id, 0) + 1
    return counts


def test_racing_final_updates_aggregate_once(aggregations):
    actor, users = make_user(), [make_user() for _ in range(4)]
    for _ in range(RACES):
        before = aggregations.updates
        training, _actor, _users = started_training(users, actor=actor)
        upload_update(training, users[0])
        upload_update(training, users[1])

        race(
            [
                partial(upload_update, training, users[2]),
                partial(upload_update, training, users[3]),
                deadlines.sweep,
            ]
        )

        training = fresh(training)
        assert aggregations.updates - before == 1
        assert training.model.round == 1
        assert training.phase == RoundPhase.MODEL_TEST
        assert count_notifications(training, "MODEL_TEST_ROUND") == {u.pk: 1 for u in users}


def test_racing_final_metrics_start_one_round():
    actor, users = make_user(), [make_user() for _ in range(3)]
    for _ in range(RACES):
        training, _actor, _users = started_training(users, actor=actor, target_num_updates=2)
        for user in users:
            upload_update(training, user)
        upload_metrics(training, users[0])

        race(
            [
                partial(upload_metrics, training, users[1]),
                partial(upload_metrics, training, users[2]),
                deadlines.sweep,
            ]
        )

        training = fresh(training)
        assert training.phase == RoundPhase.UPDATE
        assert training.phase_round == 1
        starts = Notification.objects.filter(
            training=training, notification_type="UPDATE_ROUND_START", body__round=1
        )
        assert sorted(starts.values_list("recipient_id", flat=True)) == sorted(u.pk for u in users)


def test_racing_final_swag_moments_average_once(aggregations):
    actor, users = make_user(), [make_user() for _ in range(3)]
    for _ in range(RACES):
        before = aggregations.moments
        training, _actor, _users = started_training(
            users,
            actor=actor,
            uncertainty_method="SWAG",
            options={"skip_model_tests": True},
            target_num_updates=2,
        )
        for user in users:
            upload_update(training, user)
        upload_swag(training, users[0], first=1.0, second=1.0)

        race(
            [
                partial(upload_swag, training, users[1], first=1.0, second=1.0),
                partial(upload_swag, training, users[2], first=1.0, second=1.0),
                deadlines.sweep,
            ]
        )

        training = fresh(training)
        assert aggregations.moments - before == 1
        assert training.phase == RoundPhase.UPDATE
        assert training.phase_round == 1
        assert count_notifications(training, "UPDATE_ROUND_START") == {u.pk: 2 for u in users}
