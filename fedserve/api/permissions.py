"""Access rules for every endpoint. Views call these checks; nothing else decides access.

Roles relative to an object: the owner of a model, the actor of its training, the
participants of that training, and superusers. Every `require_*` function raises
PermissionDenied (403) when the caller lacks the right; the caller has already been
authenticated, and a missing object is a 404 before any check here.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.db.models import Q, QuerySet
from rest_framework.exceptions import PermissionDenied

from fedserve.core.models import Model, ModelKind, Training


def _is_superuser(user: Any) -> bool:
    return bool(getattr(user, "is_superuser", False))


def is_participant(user: Any, training: Training | None) -> bool:
    if training is None or not user.is_authenticated:
        return False
    return training.participants.filter(pk=user.pk).exists()


def is_actor(user: Any, training: Training | None) -> bool:
    return training is not None and training.actor_id == user.pk


def _global_model(model: Model) -> Model:
    if model.kind == ModelKind.LOCAL and model.base_model is not None:
        return model.base_model
    return model


def can_read_model(user: Any, model: Model) -> bool:
    """Download, metadata, metrics and preprocessing: owner, actor, participants, superusers."""
    if _is_superuser(user) or model.owner_id == user.pk:
        return True
    global_model = _global_model(model)
    if global_model.owner_id == user.pk:
        return True
    training = global_model.get_training()
    return is_actor(user, training) or is_participant(user, training)


def require_read_model(user: Any, model: Model) -> None:
    if not can_read_model(user, model):
        raise PermissionDenied(
            f"You may not access model {model.pk}: only its owner, the actor and the "
            "participants of its training may."
        )


def require_delete_model(user: Any, model: Model) -> None:
    """Delete: the owner of the model or the actor of its training."""
    if _is_superuser(user) or model.owner_id == user.pk:
        return
    if is_actor(user, _global_model(model).get_training()):
        return
    raise PermissionDenied(
        f"You may not delete model {model.pk}: only its owner or the actor of its training may."
    )


def global_models_related_to(user: Any) -> QuerySet[Model]:
    """Models listed at GET models/: global models the user owns or whose training involves it."""
    return (
        Model.objects.exclude(kind=ModelKind.LOCAL)
        .filter(
            Q(owner_id=user.pk) | Q(training__actor_id=user.pk) | Q(training__participants=user.pk)
        )
        .distinct()
    )


def require_ensemble_member(user: Any, model: Model) -> None:
    """Members of a MEAN model: global models the caller owns."""
    if model.owner_id != user.pk:
        raise PermissionDenied(
            f"You may not add model {model.pk} to an ensemble: a MEAN model may only contain "
            "models you own."
        )


def require_upload_local_model(user: Any, model: Model) -> None:
    """Local updates: participants of the global model's training only."""
    if is_participant(user, model.get_training()):
        return
    raise PermissionDenied(
        f"You may not upload an update for model {model.pk}: you are not a participant "
        "of its training."
    )


def require_upload_metrics(user: Any, model: Model) -> None:
    """Metrics: owner, actor or participants (superusers too)."""
    if not can_read_model(user, model):
        raise PermissionDenied(
            f"You may not report metrics for model {model.pk}: only its owner, the actor and "
            "the participants of its training may."
        )


def require_upload_preprocessing(user: Any, model: Model) -> None:
    """Preprocessing module: the owner of the global model only."""
    if model.owner_id != user.pk and not _is_superuser(user):
        raise PermissionDenied(
            f"You may not set the preprocessing of model {model.pk}: only its owner may."
        )


def require_upload_swag(user: Any, model: Model) -> None:
    """SWAG moments: participants of the model's training only."""
    if not is_participant(user, model.get_training()):
        raise PermissionDenied(
            f"You may not upload SWAG moments for model {model.pk}: you are not a "
            "participant of its training."
        )


def trainings_acted_by(user: Any) -> QuerySet[Training]:
    """Trainings listed at GET trainings/: those the user is the actor of."""
    return Training.objects.filter(actor_id=user.pk)


def trainings_involving(user: Any) -> QuerySet[Training]:
    """Trainings listed at GET users/trainings/: the user is the actor or a participant."""
    return Training.objects.filter(Q(actor_id=user.pk) | Q(participants=user.pk)).distinct()


def require_create_training(user: Any, model: Model) -> None:
    """Create a training: the owner of the model."""
    if model.owner_id != user.pk and not _is_superuser(user):
        raise PermissionDenied(
            f"You may not start a training on model {model.pk}: only its owner may."
        )


def can_view_training(user: Any, training: Training) -> bool:
    return _is_superuser(user) or is_actor(user, training) or is_participant(user, training)


def require_view_training(user: Any, training: Training) -> None:
    """Read a training and its models: the actor, participants and superusers."""
    if not can_view_training(user, training):
        raise PermissionDenied(
            f"You may not access training {training.pk}: only its actor and participants may."
        )


def require_manage_training(user: Any, training: Training) -> None:
    """Delete, start, add or remove clients: the actor (and superusers)."""
    if not (_is_superuser(user) or is_actor(user, training)):
        raise PermissionDenied(f"You may not change training {training.pk}: only its actor may.")


def require_use_model_for_inference(user: Any, model: Model) -> None:
    """Inference: the owner, the training's actor and participants (superusers too)."""
    if not can_read_model(user, model):
        raise PermissionDenied(
            f"You may not run inference on model {model.pk}: only its owner, the actor and "
            "the participants of its training may."
        )


def require_registration_open(user: Any) -> None:
    """Registration: anyone while FEDSERVE_OPEN_REGISTRATION is on, superusers always."""
    if settings.FEDSERVE_OPEN_REGISTRATION or _is_superuser(user):
        return
    raise PermissionDenied(
        "Registration is closed on this server (FEDSERVE_OPEN_REGISTRATION is off); ask an "
        "administrator to create your account."
    )


def require_list_groups(user: Any) -> None:
    if not _is_superuser(user):
        raise PermissionDenied("Only superusers may list all groups; use /api/users/groups/.")


def require_group_member(user: Any, group: Group) -> None:
    """Read, change or delete a group: its members and superusers."""
    if _is_superuser(user) or group.user_set.filter(pk=user.pk).exists():
        return
    raise PermissionDenied(f"You may not access group {group.pk}: you are not a member.")
