"""Serializers for models: the model record, its metadata, metrics and upload forms."""

from __future__ import annotations

import math
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fedserve.api.serializers.fields import IdField
from fedserve.core.models import Metric, Model, ModelKind

# Largest values of the database columns on SQLite and PostgreSQL: round numbers are
# PositiveIntegerField (32-bit signed), sample sizes PositiveBigIntegerField (64-bit signed).
MAX_ROUND = 2**31 - 1
MAX_SAMPLE_SIZE = 2**63 - 1

# Fields that only some kinds of model have; the record omits them for the other kinds.
_LOCAL_ONLY_FIELDS = ("base_model", "sample_size")
_MEAN_ONLY_FIELDS = ("models",)


@extend_schema_field({"type": "integer", "nullable": True, "minimum": 1})
class InputDimensionField(serializers.Field[int | None, Any, Any, Any]):
    """One dimension of an input shape: a positive int, or None (also "None" or "null") if free."""

    default_error_messages = {
        "invalid": "Each input_shape value must be a positive integer or None, not {value!r}.",
    }

    def to_internal_value(self, data: Any) -> int | None:
        if data is None or (isinstance(data, str) and data.strip().lower() in ("none", "null")):
            return None
        if isinstance(data, bool):
            self.fail("invalid", value=data)
        try:
            value = int(str(data).strip())
        except ValueError:
            self.fail("invalid", value=data)
        if value < 1:
            self.fail("invalid", value=data)
        return value

    def to_representation(self, value: int | None) -> int | None:
        return value


class ModelSerializer(serializers.Serializer[Any]):
    """A model record without its weights."""

    id = serializers.UUIDField(read_only=True)
    name = serializers.CharField(read_only=True)
    description = serializers.CharField(read_only=True)
    round = serializers.IntegerField(read_only=True)
    owner = serializers.UUIDField(source="owner_id", read_only=True, help_text="User id.")
    input_shape = serializers.ListField(
        child=InputDimensionField(),
        allow_null=True,
        read_only=True,
        help_text="Input dimensions; null marks a free dimension such as the batch.",
    )
    type = serializers.ChoiceField(choices=ModelKind.choices, source="kind", read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    # required=False instead of read_only, so the schema shows them as optional: the record
    # carries them only for the kinds named in the help text.
    base_model = serializers.UUIDField(
        source="base_model_id", required=False, help_text="LOCAL only: the global model."
    )
    sample_size = serializers.IntegerField(
        required=False, help_text="LOCAL only: the number of training samples."
    )
    models = serializers.PrimaryKeyRelatedField(
        source="members",
        many=True,
        required=False,
        queryset=Model.objects.all(),
        help_text="MEAN only: ids of the ensemble members.",
    )

    def to_representation(self, instance: Model) -> dict[str, Any]:
        data = dict(super().to_representation(instance))
        if instance.kind != ModelKind.LOCAL:
            for field in _LOCAL_ONLY_FIELDS:
                data.pop(field, None)
        if instance.kind != ModelKind.MEAN:
            for field in _MEAN_ONLY_FIELDS:
                data.pop(field, None)
        return data

    def to_internal_value(self, data: Any) -> Any:
        raise NotImplementedError("ModelSerializer only renders models.")


class LayerSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(help_text="Dotted module path, as in named_modules().")
    type = serializers.CharField(help_text="Module class name.")
    parameters = serializers.IntegerField(help_text="Parameters of this module itself.")
    output_shape = serializers.JSONField(
        allow_null=True, help_text="Output shape; null where forward hooks are unavailable."
    )


class ModelStatsSerializer(serializers.Serializer[Any]):
    """Statistics of a model file; fields that cannot be computed for a file are null."""

    format = serializers.CharField(help_text="Stored file format.")
    file_size = serializers.IntegerField(help_text="Bytes.")
    total_parameters = serializers.IntegerField(
        help_text="Parameter values (for a weights-only file: all tensor values)."
    )
    trainable_parameters = serializers.IntegerField(allow_null=True)
    parameter_bytes = serializers.IntegerField()
    buffer_bytes = serializers.IntegerField(allow_null=True)
    input_shape = serializers.ListField(
        child=serializers.IntegerField(),
        allow_null=True,
        help_text="Shape of the zero tensor the layer summary ran on.",
    )
    output_shape = serializers.JSONField(allow_null=True)
    layers = LayerSerializer(many=True, allow_null=True)


class ModelMetadataSerializer(ModelSerializer):
    """A model record with `has_preprocessing` and `stats` (from context["stats"])."""

    has_preprocessing = serializers.SerializerMethodField()
    stats = serializers.SerializerMethodField()

    def get_has_preprocessing(self, model: Model) -> bool:
        target = model.base_model if model.kind == ModelKind.LOCAL else model
        return bool(target is not None and target.preprocessing_path)

    @extend_schema_field(ModelStatsSerializer(allow_null=True))
    def get_stats(self, model: Model) -> dict[str, Any] | None:
        stats: dict[str, Any] | None = self.context.get("stats")
        return stats


class MetricSerializer(serializers.ModelSerializer[Metric]):
    """A reported metric; `value_float` or `value_text` contains the value."""

    class Meta:
        model = Metric
        fields = [
            "id",
            "model",
            "identifier",
            "key",
            "value_float",
            "value_text",
            "step",
            "reporter",
            "created_at",
        ]
        read_only_fields = fields


def _metric_lists(attrs: dict[str, Any], *, required: bool) -> dict[str, Any]:
    names = attrs.get("metric_names") or []
    values = attrs.get("metric_values") or []
    if len(names) != len(values):
        raise serializers.ValidationError(
            {
                "metric_values": [
                    f"metric_names has {len(names)} entries and metric_values has "
                    f"{len(values)}; send one value per name."
                ]
            }
        )
    if required and not names:
        raise serializers.ValidationError(
            {"metric_names": ["Send at least one metric name with its value."]}
        )
    attrs["metrics"] = [
        (name, parse_metric_value(value)) for name, value in zip(names, values, strict=True)
    ]
    return attrs


def parse_metric_value(raw: str) -> tuple[float | None, str | None]:
    """Split a reported value into (float, None), or (None, text) when it is no finite float."""
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None, str(raw)
    if not math.isfinite(number):
        # JSON has no NaN or infinity, so such values are kept as text.
        return None, str(raw)
    return number, None


def _metric_names_field(**options: Any) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=256), help_text="Repeated field.", **options
    )


def _metric_values_field(**options: Any) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=10_000, allow_blank=True),
        help_text="Repeated field, one per name; a value that is not a finite float is stored "
        "as text.",
        **options,
    )


class ModelUploadSerializer(serializers.Serializer[Any]):
    """Form of POST models/ (multipart; JSON for MEAN)."""

    name = serializers.CharField(max_length=256)
    description = serializers.CharField(allow_blank=True)
    # All kinds are listed, as in the model record, so the schema has one enum of them.
    type = serializers.ChoiceField(
        choices=ModelKind.choices,
        default=ModelKind.GLOBAL,
        help_text="GLOBAL, SWAG or MEAN; LOCAL models are uploaded to models/<id>/.",
    )
    model_file = serializers.FileField(
        required=False, help_text="TorchScript archive; required except for MEAN."
    )
    model_preprocessing_file = serializers.FileField(
        required=False, help_text="Optional TorchScript module applied to inference inputs."
    )
    input_shape = serializers.ListField(
        child=InputDimensionField(),
        required=False,
        allow_null=True,
        help_text="Repeated field; each value an int or None for a free dimension.",
    )
    models = serializers.ListField(
        child=IdField(),
        required=False,
        help_text="MEAN only: ids of global models you own.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        kind = attrs["type"]
        if kind == ModelKind.LOCAL:
            raise serializers.ValidationError(
                {
                    "type": [
                        "A LOCAL model is a participant's update; upload it with POST "
                        "models/<global model id>/ instead."
                    ]
                }
            )
        if kind == ModelKind.MEAN:
            if not attrs.get("models"):
                raise serializers.ValidationError(
                    {"models": ["A MEAN model needs the ids of its member models in models."]}
                )
            if attrs.get("model_file") is not None:
                raise serializers.ValidationError(
                    {"model_file": ["A MEAN model has no file of its own; send only models."]}
                )
        else:
            if attrs.get("model_file") is None:
                raise serializers.ValidationError(
                    {"model_file": [f"A {kind} model needs a model_file (a TorchScript archive)."]}
                )
            if attrs.get("models"):
                raise serializers.ValidationError(
                    {"models": [f"models is for MEAN models only, not {kind}."]}
                )
        return attrs


class MeanModelUploadSerializer(serializers.Serializer[Any]):
    """JSON body of POST models/ for a MEAN model (documentation of the JSON form)."""

    name = serializers.CharField(max_length=256)
    description = serializers.CharField(allow_blank=True)
    type = serializers.ChoiceField(choices=ModelKind.choices, help_text="MEAN.")
    input_shape = serializers.ListField(
        child=InputDimensionField(), required=False, allow_null=True
    )
    models = serializers.ListField(child=IdField(), help_text="Ids of global models you own.")


class LocalModelUploadSerializer(serializers.Serializer[Any]):
    """Form of POST models/<id>/ (multipart): a participant's update for one round."""

    round = serializers.IntegerField(
        min_value=0, max_value=MAX_ROUND, help_text="The global model's current round."
    )
    sample_size = serializers.IntegerField(
        min_value=1,
        max_value=MAX_SAMPLE_SIZE,
        help_text="Number of training samples, a positive integer.",
    )
    model_file = serializers.FileField(
        help_text="State dict (torch.save or safetensors) or TorchScript archive."
    )
    metric_names = _metric_names_field(required=False)
    metric_values = _metric_values_field(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return _metric_lists(attrs, required=False)


class MetricsUploadSerializer(serializers.Serializer[Any]):
    """Body of POST models/<id>/metrics/ (JSON, form or multipart)."""

    metric_names = _metric_names_field()
    metric_values = _metric_values_field()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return _metric_lists(attrs, required=True)


class PreprocessingUploadSerializer(serializers.Serializer[Any]):
    """Form of POST models/<id>/preprocessing/ (multipart)."""

    model_preprocessing_file = serializers.FileField(help_text="TorchScript module.")


class SwagUploadSerializer(serializers.Serializer[Any]):
    """Form of POST models/<id>/swag/ (multipart)."""

    round = serializers.IntegerField(min_value=0, max_value=MAX_ROUND)
    sample_size = serializers.IntegerField(min_value=1, max_value=MAX_SAMPLE_SIZE)
    first_moment_file = serializers.FileField(
        help_text="torch.save of a 1-D float tensor: mean of the flattened parameters."
    )
    second_moment_file = serializers.FileField(
        help_text="torch.save of a 1-D float tensor: mean of the squared flattened parameters."
    )


class ModelCreatedSerializer(serializers.Serializer[Any]):
    detail = serializers.CharField()
    model_id = serializers.UUIDField()


class ModelMessageSerializer(serializers.Serializer[Any]):
    detail = serializers.CharField()
