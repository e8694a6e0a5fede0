"""Transitions of the training life cycle on the embedded default, with tasks run inline."""

from __future__ import annotations

import pytest
import torch

from fedserve import modelstore, rounds
from fedserve.core.models import Model, ModelKind, RoundPhase, TrainingState
from tests.factories import make_training, make_user
from tests.rounds.conftest import (
    fresh,
    global_state,
    received,
    started_training,
    types_received,
    upload_metrics,
    upload_swag,
    upload_update,
)

pytestmark = pytest.mark.usefixtures("lifecycle")


def test_start_sends_training_start_then_round_start():
    training, actor, users = started_training(participants=2)

    assert training.state == TrainingState.ONGOING
    assert training.phase == RoundPhase.UPDATE
    assert training.phase_round == 0
    for user in users:
        assert types_received(user) == ["TRAINING_START", "UPDATE_ROUND_START"]
        assert received(user, "TRAINING_START") == [{"global_model_uuid": str(training.model_id)}]
        assert received(user, "UPDATE_ROUND_START") == [
            {"round": 0, "global_model_uuid": str(training.model_id)}
        ]
    assert types_received(actor) == []


def test_start_of_started_training_changes_nothing():
    training, _actor, users = started_training(participants=1)

    assert rounds.start_training(training) is False
    assert types_received(users[0]) == ["TRAINING_START", "UPDATE_ROUND_START"]


def test_fedprox_round_start_carries_mu():
    training, _actor, users = started_training(
        participants=1, aggregation_method="FedProx", options={"mu": 0.5}
    )

    assert received(users[0], "UPDATE_ROUND_START") == [
        {"round": 0, "global_model_uuid": str(training.model_id), "mu": 0.5}
    ]


def test_swag_training_start_makes_model_swag():
    training, _actor, _users = started_training(participants=1, uncertainty_method="SWAG")

    assert fresh(training).model.kind == ModelKind.SWAG


def test_round_waits_for_every_participant(aggregations):
    training, _actor, users = started_training(participants=3)

    upload_update(training, users[0])
    upload_update(training, users[1])

    training = fresh(training)
    assert training.phase == RoundPhase.UPDATE
    assert training.model.round == 0
    assert aggregations.updates == 0


def test_last_update_aggregates_weighted_by_sample_size(aggregations):
    training, _actor, users = started_training(participants=2)
    old_path = training.model.weights_path

    first = upload_update(training, users[0], value=1.0, sample_size=30)
    second = upload_update(training, users[1], value=5.0, sample_size=10)

    training = fresh(training)
    assert aggregations.updates == 1
    assert training.model.round == 1
    assert training.model.weights_path != old_path
    assert "round-1" in training.model.weights_path
    assert not modelstore.exists(old_path)
    for tensor in global_state(training).values():
        assert torch.allclose(tensor, torch.full_like(tensor, 2.0))
    assert not Model.objects.filter(pk__in=[first.pk, second.pk]).exists()
    assert not modelstore.exists(first.weights_path)
    assert training.phase == RoundPhase.MODEL_TEST
    assert training.phase_round == 1
    for user in users:
        assert received(user, "MODEL_TEST_ROUND") == [
            {"round": 1, "global_model_uuid": str(training.model_id)}
        ]


def test_local_models_kept_when_option_off():
    training, _actor, users = started_training(
        participants=1, options={"delete_local_models_after_aggregation": False}
    )

    local = upload_update(training, users[0])

    assert fresh(training).model.round == 1
    assert Model.objects.filter(pk=local.pk).exists()
    assert modelstore.exists(local.weights_path)


def test_metrics_from_all_start_next_round():
    training, _actor, users = started_training(participants=2, target_num_updates=2)
    for user in users:
        upload_update(training, user)

    upload_metrics(training, users[0])
    assert fresh(training).phase == RoundPhase.MODEL_TEST
    upload_metrics(training, users[1])

    training = fresh(training)
    assert training.phase == RoundPhase.UPDATE
    assert training.phase_round == 1
    for user in users:
        assert types_received(user)[-1] == "UPDATE_ROUND_START"
        assert received(user, "UPDATE_ROUND_START")[-1] == {
            "round": 1,
            "global_model_uuid": str(training.model_id),
        }


def test_skip_model_tests_goes_to_next_round():
    training, _actor, users = started_training(
        participants=1, target_num_updates=2, options={"skip_model_tests": True}
    )

    upload_update(training, users[0])

    training = fresh(training)
    assert training.phase == RoundPhase.UPDATE
    assert training.phase_round == 1
    assert "MODEL_TEST_ROUND" not in types_received(users[0])


def test_tests_only_final_round_when_option_off():
    training, actor, users = started_training(
        participants=1, target_num_updates=2, options={"model_test_after_each_round": False}
    )

    upload_update(training, users[0])
    assert fresh(training).phase == RoundPhase.UPDATE
    upload_update(training, users[0])
    assert fresh(training).phase == RoundPhase.MODEL_TEST
    upload_metrics(training, users[0])

    training = fresh(training)
    assert training.state == TrainingState.COMPLETED
    assert types_received(users[0]) == [
        "TRAINING_START",
        "UPDATE_ROUND_START",
        "UPDATE_ROUND_START",
        "MODEL_TEST_ROUND",
        "TRAINING_FINISHED",
    ]
    assert received(actor) == [{"global_model_uuid": str(training.model_id)}]


def test_last_round_finishes_training():
    training, actor, users = started_training(participants=2, target_num_updates=1)
    for user in users:
        upload_update(training, user)
    for user in users:
        upload_metrics(training, user)

    training = fresh(training)
    assert training.state == TrainingState.COMPLETED
    assert training.phase == RoundPhase.NONE
    assert training.model.round == 1
    for user in [*users, actor]:
        assert received(user, "TRAINING_FINISHED") == [
            {"global_model_uuid": str(training.model_id)}
        ]


def test_actor_participant_gets_one_finished_notification():
    actor = make_user()
    other = make_user()
    training = make_training(
        actor, [actor, other], target_num_updates=1, options={"skip_model_tests": True}
    )
    rounds.start_training(training)

    upload_update(training, actor)
    upload_update(training, other)

    assert fresh(training).state == TrainingState.COMPLETED
    assert len(received(actor, "TRAINING_FINISHED")) == 1


def test_swag_round_averages_moments(aggregations):
    training, _actor, users = started_training(
        participants=2, target_num_updates=1, uncertainty_method="SWAG"
    )
    for user in users:
        upload_update(training, user)

    training = fresh(training)
    assert training.state == TrainingState.SWAG_ROUND
    assert training.phase == RoundPhase.SWAG
    for user in users:
        assert received(user, "SWAG_ROUND_START") == [
            {"round": 1, "global_model_uuid": str(training.model_id)}
        ]

    statistic = upload_swag(training, users[0], first=1.0, second=2.0, sample_size=10)
    upload_swag(training, users[1], first=4.0, second=8.0, sample_size=20)

    training = fresh(training)
    assert aggregations.moments == 1
    assert training.state == TrainingState.ONGOING
    assert training.phase == RoundPhase.MODEL_TEST
    with modelstore.open_file(training.model.swag_first_moment_path) as handle:
        first = torch.load(handle, weights_only=True)
    with modelstore.open_file(training.model.swag_second_moment_path) as handle:
        second = torch.load(handle, weights_only=True)
    assert torch.allclose(first, torch.full_like(first, 3.0))
    assert torch.allclose(second, torch.full_like(second, 6.0))
    assert not modelstore.exists(statistic.first_moment_path)
    assert not training.model.swag_statistics.exists()


def test_feddc_passes_updates_on_between_aggregations(aggregations):
    training, _actor, users = started_training(
        participants=3,
        target_num_updates=1,
        aggregation_method="FedDC",
        options={"daisy_chain_period": 2, "skip_model_tests": True},
    )
    first_round = {user.pk: upload_update(training, user).pk for user in users}

    training = fresh(training)
    assert aggregations.updates == 0
    assert training.phase == RoundPhase.DAISY_CHAIN
    assert training.model.round == 1
    handed = {}
    for user in users:
        bodies = received(user, "UPDATE_ROUND_START")
        assert len(bodies) == 2
        assert bodies[-1]["round"] == 1
        handed[user.pk] = bodies[-1]["global_model_uuid"]
        assert handed[user.pk] != str(first_round[user.pk])
    assert sorted(handed.values()) == sorted(str(pk) for pk in first_round.values())

    for user in users:
        upload_update(training, user)

    training = fresh(training)
    assert aggregations.updates == 1
    assert training.state == TrainingState.COMPLETED
    assert training.model.round == 2
    assert not Model.objects.filter(base_model=training.model).exists()


def test_removing_last_missing_participant_completes_round(aggregations):
    training, _actor, users = started_training(participants=3)
    upload_update(training, users[0])
    upload_update(training, users[1])

    training.participants.remove(users[2])
    rounds.participants_removed(training)

    assert aggregations.updates == 1
    assert fresh(training).model.round == 1
    assert received(users[2], "MODEL_TEST_ROUND") == []


def test_rejecting_participant_is_removed_and_round_completes():
    training, _actor, users = started_training(participants=2)
    upload_update(training, users[0])

    rounds.participant_rejected(training.pk, users[1].pk)

    training = fresh(training)
    assert list(training.participants.all()) == [users[0]]
    assert training.phase == RoundPhase.MODEL_TEST


def test_removing_every_participant_fails_training():
    training, _actor, users = started_training(participants=1)

    rounds.participant_rejected(training.pk, users[0].pk)

    training = fresh(training)
    assert training.state == TrainingState.ERROR
    assert "Every participant left" in training.error_reason


def test_unreachable_participant_is_kept_and_marked():
    training, _actor, users = started_training(participants=2)

    rounds.participant_unreachable(training.pk, users[1].pk)

    participation = training.participation_set.get(user=users[1])
    assert participation.unreachable is True
    assert fresh(training).phase == RoundPhase.UPDATE

    upload_update(training, users[1])
    participation.refresh_from_db()
    assert participation.unreachable is False


def test_broken_update_fails_training():
    training, _actor, users = started_training(participants=1)
    local = Model.objects.create(
        kind=ModelKind.LOCAL,
        owner=users[0],
        base_model=training.model,
        round=0,
        sample_size=5,
        weights_path=modelstore.save(
            "models/broken/weights.pt",
            __import__("io").BytesIO(b"not a model file"),
        ),
        weights_format="state_dict",
    )

    rounds.local_model_uploaded(local)

    training = fresh(training)
    assert training.state == TrainingState.ERROR
    assert "Aggregation of round 0 failed" in training.error_reason
    assert training.model.round == 0
