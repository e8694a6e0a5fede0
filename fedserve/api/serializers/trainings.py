"""Serializers for trainings: the create body, the client list and the training record."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fedserve.api.serializers.fields import IdField
from fedserve.api.serializers.models import MAX_ROUND
from fedserve.core.models import (
    AggregationMethod,
    Participation,
    RoundPhase,
    Training,
    UncertaintyMethod,
)
from fedserve.rounds import progress
from fedserve.rounds.options import OptionsError, TrainingOptions


class TrainingCreateSerializer(serializers.Serializer[Any]):
    """Body of POST trainings/."""

    model_id = IdField(help_text="Id of a global model you own.")
    target_num_updates = serializers.IntegerField(
        min_value=1, max_value=MAX_ROUND, help_text="Number of aggregation rounds to run."
    )
    metric_names = serializers.ListField(
        child=serializers.CharField(max_length=256),
        default=list,
        help_text="Names of the metrics participants report in test rounds.",
    )
    aggregation_method = serializers.ChoiceField(choices=AggregationMethod.choices)
    uncertainty_method = serializers.ChoiceField(
        choices=UncertaintyMethod.choices, default=UncertaintyMethod.NONE
    )
    options = serializers.JSONField(
        default=dict,
        help_text="Training options object, for example "
        '{"daisy_chain_period": 2, "uncertainty": {"N": 10, "softmax": true}}.',
    )
    clients = serializers.ListField(
        child=IdField(),
        default=list,
        help_text="User ids of the participants.",
    )

    def validate_options(self, value: Any) -> dict[str, Any]:
        try:
            return TrainingOptions.parse(value).to_json()
        except OptionsError as error:
            raise serializers.ValidationError(str(error)) from None


class TrainingClientsSerializer(serializers.Serializer[Any]):
    """Body of PUT and DELETE trainings/<id>/clients/."""

    clients = serializers.ListField(child=IdField(), allow_empty=False, help_text="User ids.")


class TrainingCreatedSerializer(serializers.Serializer[Any]):
    detail = serializers.CharField()
    training_id = serializers.UUIDField()


class DetailSerializer(serializers.Serializer[Any]):
    detail = serializers.CharField()


class TrainingSerializer(serializers.ModelSerializer[Training]):
    """A training with its round progress."""

    participants = serializers.SerializerMethodField()
    round = serializers.IntegerField(source="model.round", read_only=True)
    local_models_arrived = serializers.SerializerMethodField()
    local_models_expected = serializers.SerializerMethodField()
    missing_participants = serializers.SerializerMethodField()
    unreachable_participants = serializers.SerializerMethodField()

    class Meta:
        model = Training
        fields = [
            "id",
            "model",
            "actor",
            "participants",
            "state",
            "target_num_updates",
            "last_update",
            "uncertainty_method",
            "aggregation_method",
            "options",
            "locked",
            "metric_names",
            "local_models_arrived",
            "local_models_expected",
            "phase",
            "round",
            "missing_participants",
            "unreachable_participants",
            "error_reason",
        ]
        read_only_fields = fields

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Several fields need the participant list, so it is read once per training.
        self._participant_cache: dict[Any, list[Any]] = {}

    def _participant_ids(self, training: Training) -> list[Any]:
        cache = self._participant_cache
        if training.pk not in cache:
            cache[training.pk] = list(
                Participation.objects.filter(training=training)
                .order_by("joined_at", "id")
                .values_list("user_id", flat=True)
            )
        return cache[training.pk]

    def get_participants(self, training: Training) -> list[str]:
        return [str(user_id) for user_id in self._participant_ids(training)]

    def get_local_models_arrived(self, training: Training) -> int:
        """Participants' LOCAL models of the global model for the current round."""
        return progress.local_updates(training, _current_round(training)).count()

    def get_local_models_expected(self, training: Training) -> int:
        return len(self._participant_ids(training))

    def get_missing_participants(self, training: Training) -> list[str]:
        """Participants that have not sent what the current phase waits for."""
        round_number = _current_round(training)
        arrived: set[Any]
        if training.phase in (RoundPhase.UPDATE, RoundPhase.DAISY_CHAIN):
            updates = progress.local_updates(training, round_number)
            arrived = set(updates.values_list("owner_id", flat=True))
        elif training.phase == RoundPhase.SWAG:
            statistics = progress.swag_statistics(training, round_number)
            arrived = set(statistics.values_list("owner_id", flat=True))
        elif training.phase == RoundPhase.MODEL_TEST:
            reporters = progress.metric_reporters(training, round_number)
            arrived = set(reporters.values_list("reporter_id", flat=True))
        else:
            return []
        return [
            str(user_id) for user_id in self._participant_ids(training) if user_id not in arrived
        ]

    def get_unreachable_participants(self, training: Training) -> list[str]:
        return [
            str(user_id)
            for user_id in Participation.objects.filter(training=training, unreachable=True)
            .order_by("joined_at", "id")
            .values_list("user_id", flat=True)
        ]


def _current_round(training: Training) -> int:
    """Return the round the current phase collects for; before the start, the model's round."""
    return training.phase_round if training.phase else training.model.round
