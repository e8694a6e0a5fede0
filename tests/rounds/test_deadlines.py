"""Round deadlines, lapsed claims and the sweep that re-drives trainings."""

from __future__ import annotations

import datetime

import pytest
from django.utils import timezone

from fedserve.core.models import Model, Participation, RoundPhase, Training, TrainingState
from fedserve.rounds import deadlines, switch
from fedserve.rounds.progress import AGGREGATING
from tests.rounds.conftest import (
    fresh,
    received,
    started_training,
    store_update,
    upload_metrics,
    upload_update,
)

pytestmark = pytest.mark.usefixtures("lifecycle")


def expire(training: Training) -> None:
    """Move the training's current deadline (or claim lease) into the past."""
    Training.objects.filter(pk=training.pk).update(
        phase_deadline=timezone.now() - datetime.timedelta(seconds=1)
    )


def test_phase_gets_deadline_from_option():
    before = timezone.now()
    training, _actor, _users = started_training(
        participants=1, options={"round_timeout_seconds": 30}
    )

    assert training.phase_deadline is not None
    assert training.phase_deadline >= before + datetime.timedelta(seconds=30)


def test_no_deadline_without_option():
    training, _actor, _users = started_training(participants=1)

    assert training.phase_deadline is None


def test_deadline_with_enough_updates_aggregates_arrived(aggregations):
    training, _actor, users = started_training(
        participants=3, options={"round_timeout_seconds": 30, "min_updates": 2}
    )
    upload_update(training, users[0], value=1.0)
    upload_update(training, users[1], value=3.0)
    assert deadlines.sweep() == 0

    expire(training)
    assert deadlines.sweep() == 1

    training = fresh(training)
    assert aggregations.updates == 1
    assert training.model.round == 1
    assert training.phase == RoundPhase.MODEL_TEST
    assert training.participants.count() == 3
    assert received(users[2], "MODEL_TEST_ROUND") == [
        {"round": 1, "global_model_uuid": str(training.model_id)}
    ]


def test_deadline_with_too_few_updates_fails_training(aggregations):
    training, _actor, users = started_training(
        participants=3, options={"round_timeout_seconds": 30, "min_updates": 2}
    )
    upload_update(training, users[0])

    expire(training)
    deadlines.sweep()

    training = fresh(training)
    assert aggregations.updates == 0
    assert training.state == TrainingState.ERROR
    assert training.phase == RoundPhase.NONE
    assert "1 of 3 participants" in training.error_reason
    assert "at least 2" in training.error_reason


def test_deadline_without_min_updates_needs_one(aggregations):
    training, _actor, _users = started_training(
        participants=2, options={"round_timeout_seconds": 30}
    )

    expire(training)
    deadlines.sweep()

    training = fresh(training)
    assert training.state == TrainingState.ERROR
    assert "at least 1" in training.error_reason


def test_test_round_deadline_goes_on_with_arrived_metrics():
    training, _actor, users = started_training(
        participants=2, target_num_updates=2, options={"round_timeout_seconds": 30}
    )
    for user in users:
        upload_update(training, user)
    upload_metrics(training, users[0])

    expire(training)
    deadlines.sweep()

    training = fresh(training)
    assert training.phase == RoundPhase.UPDATE
    assert training.phase_round == 1


def test_unreachable_participant_left_behind_at_deadline():
    from fedserve import rounds

    training, _actor, users = started_training(
        participants=2, options={"round_timeout_seconds": 30, "skip_model_tests": True}
    )
    upload_update(training, users[0])
    rounds.participant_unreachable(training.pk, users[1].pk)
    assert fresh(training).phase_round == 0

    expire(training)
    deadlines.sweep()

    assert fresh(training).phase_round == 1


def test_sweep_redrives_lost_trigger(aggregations):
    training, _actor, users = started_training(participants=2)
    for user in users:
        store_update(training, user)
    assert fresh(training).model.round == 0

    assert deadlines.sweep() == 1

    assert aggregations.updates == 1
    assert fresh(training).model.round == 1


def test_sweep_ignores_waiting_and_finished_trainings():
    waiting, _actor, users = started_training(participants=2)
    upload_update(waiting, users[0])
    finished, _actor, others = started_training(
        participants=1, target_num_updates=1, options={"skip_model_tests": True}
    )
    upload_update(finished, others[0])
    assert fresh(finished).state == TrainingState.COMPLETED

    assert deadlines.sweep() == 0


def test_live_claim_blocks_second_check(aggregations):
    training, _actor, users = started_training(participants=1)
    store_update(training, users[0])
    claim = switch._check_and_claim(training.pk)
    assert claim is not None

    switch.check_round(training.pk)
    assert deadlines.sweep() == 0

    assert aggregations.updates == 0
    assert fresh(training).phase == AGGREGATING


def test_lapsed_claim_is_claimed_again(aggregations):
    training, _actor, users = started_training(participants=1)
    store_update(training, users[0])
    lapsed = switch._check_and_claim(training.pk)
    assert lapsed is not None
    expire(training)

    assert deadlines.sweep() == 1

    training = fresh(training)
    assert aggregations.updates == 1
    assert training.model.round == 1
    assert training.phase == RoundPhase.MODEL_TEST


def test_holder_of_lapsed_claim_discards_its_result(aggregations, model_store):
    training, _actor, users = started_training(
        participants=1, options={"delete_local_models_after_aggregation": False}
    )
    store_update(training, users[0])
    lapsed = switch._check_and_claim(training.pk)
    assert lapsed is not None
    expire(training)
    deadlines.sweep()
    switched = fresh(training).model.weights_path

    switch._aggregate_and_commit(lapsed)

    training = fresh(training)
    assert aggregations.updates == 2
    assert training.model.round == 1
    assert training.model.weights_path == switched
    leftovers = list(model_store.rglob(f"*{lapsed.attempt}*"))
    assert leftovers == []
    assert received(users[0], "MODEL_TEST_ROUND") == [
        {"round": 1, "global_model_uuid": str(training.model_id)}
    ]


def test_claim_without_updates_returns_to_collecting(aggregations):
    training, _actor, users = started_training(participants=2)
    store_update(training, users[0])
    store_update(training, users[1])
    claim = switch._check_and_claim(training.pk)
    assert claim is not None
    Model.objects.filter(base_model=training.model).delete()

    switch._aggregate_and_commit(claim)

    training = fresh(training)
    assert aggregations.updates == 0
    assert training.phase == RoundPhase.UPDATE
    assert training.model.round == 0


def test_check_of_deleted_training_does_nothing():
    training, _actor, _users = started_training(participants=1)
    training_id = training.pk
    training.delete()

    switch.check_round(training_id)

    assert not Training.objects.filter(pk=training_id).exists()


def test_open_round_check_skips_lock(aggregations, monkeypatch):
    training, _actor, users = started_training(participants=2)
    locked = []
    original = switch.locked_training

    def counting(training_id):
        locked.append(training_id)
        return original(training_id)

    monkeypatch.setattr(switch, "locked_training", counting)
    store_update(training, users[0])
    switch.check_round(training.pk)
    assert locked == []

    store_update(training, users[1])
    switch.check_round(training.pk)
    assert locked
    assert aggregations.updates == 1
    assert fresh(training).model.round == 1


def test_sweep_fails_training_without_participants():
    training, _actor, _users = started_training(participants=2)
    Participation.objects.filter(training_id=training.pk).delete()

    assert deadlines.sweep() == 1

    training = fresh(training)
    assert training.state == TrainingState.ERROR
    assert "Every participant left" in training.error_reason
