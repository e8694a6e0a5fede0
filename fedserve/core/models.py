"""Domain records: users, global and local models, trainings, metrics and notifications.

Model files (weights, preprocessing modules, SWAG moments) live in the model store
(`fedserve.modelstore`); rows keep only their storage paths.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person or organisation: an actor starts trainings, a client takes part in them."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    actor = models.BooleanField(default=False)
    client = models.BooleanField(default=False)
    # Empty for a participant that pulls its notifications instead of receiving webhooks.
    message_endpoint = models.URLField(max_length=2048, blank=True, default="")


class ModelKind(models.TextChoices):
    GLOBAL = "GLOBAL"
    SWAG = "SWAG"
    MEAN = "MEAN"
    LOCAL = "LOCAL"


class FileFormat(models.TextChoices):
    """How a stored model file was serialized; decides how `fedserve.modelfiles` loads it."""

    TORCHSCRIPT = "torchscript"
    STATE_DICT = "state_dict"
    SAFETENSORS = "safetensors"
    PICKLED_MODULE = "pickled_module"


class Model(models.Model):
    """A global model (GLOBAL, SWAG, MEAN) or a participant's local update (LOCAL).

    `round` is the number of aggregations a global model has been through; for a local
    model it is the round the update was trained for.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=8, choices=ModelKind.choices, default=ModelKind.GLOBAL)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="models"
    )
    name = models.CharField(max_length=256, blank=True, default="")
    description = models.TextField(blank=True, default="")
    round = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Storage paths in the model store; empty when the model has no such file.
    weights_path = models.CharField(max_length=512, blank=True, default="")
    weights_format = models.CharField(
        max_length=16, choices=FileFormat.choices, blank=True, default=""
    )
    weights_size = models.BigIntegerField(default=0)
    preprocessing_path = models.CharField(max_length=512, blank=True, default="")
    preprocessing_format = models.CharField(
        max_length=16, choices=FileFormat.choices, blank=True, default=""
    )

    # List of ints and nulls (a null dimension is free), or null when unknown.
    input_shape = models.JSONField(null=True, blank=True, default=None)

    # LOCAL only: the global model this update belongs to, and its training sample count.
    base_model = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="local_models"
    )
    sample_size = models.PositiveBigIntegerField(null=True, blank=True)

    # SWAG only: aggregated first and second moments of the flattened parameters.
    swag_first_moment_path = models.CharField(max_length=512, blank=True, default="")
    swag_second_moment_path = models.CharField(max_length=512, blank=True, default="")

    # MEAN only: the ensemble members, all global models of the same owner.
    members = models.ManyToManyField("self", symmetrical=False, blank=True, related_name="+")

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["base_model", "round"])]
        constraints = [
            # A participant uploads at most one update per global model and round.
            models.UniqueConstraint(
                fields=["base_model", "owner", "round"],
                condition=models.Q(kind="LOCAL"),
                name="one_local_update_per_round",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} model {self.id} ({self.name!r}, round {self.round})"

    @property
    def is_global(self) -> bool:
        return self.kind != ModelKind.LOCAL

    def storage_paths(self) -> list[str]:
        """Return every model-store path this row refers to."""
        paths = [
            self.weights_path,
            self.preprocessing_path,
            self.swag_first_moment_path,
            self.swag_second_moment_path,
        ]
        return [p for p in paths if p]

    def get_training(self) -> Training | None:
        """Return the training of this model (of its base model, for a local model)."""
        target = self.base_model if self.kind == ModelKind.LOCAL else self
        if target is None:
            return None
        try:
            return target.training
        except Training.DoesNotExist:
            return None


class TrainingState(models.TextChoices):
    INITIAL = "I"
    ONGOING = "O"
    SWAG_ROUND = "S"
    COMPLETED = "C"
    ERROR = "E"


class RoundPhase(models.TextChoices):
    """Stage of an ongoing training, named after the uploads it waits for."""

    NONE = "", "not started"
    UPDATE = "UPDATE", "local updates"
    MODEL_TEST = "MODEL_TEST", "test metrics"
    SWAG = "SWAG", "SWAG moments"
    DAISY_CHAIN = "DAISY_CHAIN", "daisy-chained updates"
    # Set by fedserve.rounds while one worker has claimed the round to aggregate it.
    AGGREGATING = "AGGREGATING", "aggregation"


class AggregationMethod(models.TextChoices):
    FEDAVG = "FedAvg"
    FEDPROX = "FedProx"
    FEDDC = "FedDC"


class UncertaintyMethod(models.TextChoices):
    NONE = "NONE"
    ENSEMBLE = "ENSEMBLE"
    MC_DROPOUT = "MC_DROPOUT"
    SWAG = "SWAG"


class Training(models.Model):
    """A federated training of one global model by its participants, driven by an actor."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.OneToOneField(Model, on_delete=models.CASCADE, related_name="training")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="actor_trainings"
    )
    participants = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="Participation", related_name="trainings"
    )
    state = models.CharField(
        max_length=1, choices=TrainingState.choices, default=TrainingState.INITIAL
    )
    target_num_updates = models.PositiveIntegerField()
    last_update = models.DateTimeField(auto_now=True)
    uncertainty_method = models.CharField(
        max_length=16, choices=UncertaintyMethod.choices, default=UncertaintyMethod.NONE
    )
    aggregation_method = models.CharField(max_length=16, choices=AggregationMethod.choices)
    options: Any = models.JSONField(default=dict, blank=True)
    metric_names = models.JSONField(default=list, blank=True)
    locked = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    # Round bookkeeping, owned by fedserve.rounds.
    phase = models.CharField(
        max_length=16, choices=RoundPhase.choices, blank=True, default=RoundPhase.NONE
    )
    phase_round = models.PositiveIntegerField(default=0)
    phase_started_at = models.DateTimeField(null=True, blank=True)
    phase_deadline = models.DateTimeField(null=True, blank=True)
    error_reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"training {self.id} (state {self.state})"


class Participation(models.Model):
    """A user's membership in a training, with its delivery status."""

    training = models.ForeignKey(Training, on_delete=models.CASCADE)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    joined_at = models.DateTimeField(auto_now_add=True)
    # Set when webhook retries ran out; cleared on the next successful delivery or upload.
    unreachable = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["training", "user"], name="one_participation")
        ]


class Metric(models.Model):
    """One named value reported for a model at a step (the model's round)."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="metrics")
    identifier = models.CharField(max_length=256)
    key = models.CharField(max_length=256, blank=True, default="")
    value_float = models.FloatField(null=True, blank=True)
    value_text = models.TextField(null=True, blank=True)
    step = models.IntegerField(default=0)
    reporter = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["model", "step"])]


class SwagStatistic(models.Model):
    """A participant's SWAG moments for one round, kept until they are aggregated."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="swag_statistics")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    round = models.PositiveIntegerField()
    sample_size = models.PositiveBigIntegerField()
    first_moment_path = models.CharField(max_length=512)
    second_moment_path = models.CharField(max_length=512)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["model", "owner", "round"], name="one_swag_statistic_per_round"
            )
        ]

    def storage_paths(self) -> list[str]:
        return [self.first_moment_path, self.second_moment_path]


class Notification(models.Model):
    """A message to one user, kept in order for pulling clients; `id` is the sequence number."""

    id = models.BigAutoField(primary_key=True)
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    training = models.ForeignKey(Training, null=True, blank=True, on_delete=models.SET_NULL)
    notification_type = models.CharField(max_length=32)
    body = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    # Webhook delivery status; pull-only recipients keep PULL_ONLY.
    delivery_state = models.CharField(max_length=16, default="PENDING")
    delivery_attempts = models.PositiveIntegerField(default=0)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["recipient", "id"])]

    def payload(self) -> dict[str, Any]:
        """Return the JSON body sent to a webhook, as in the wire contract."""
        return {
            "notification_type": self.notification_type,
            "training_uuid": str(self.training_id) if self.training_id else None,
            "body": self.body,
        }
