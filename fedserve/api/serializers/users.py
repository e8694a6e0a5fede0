"""Serializers for users and groups."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from rest_framework import serializers
from rest_framework.authtoken.models import Token

from fedserve.core.models import User
from fedserve.notify import webhook


class UserSerializer(serializers.ModelSerializer[User]):
    """A user; `token` is present only for the user named in the context's `token_owner`."""

    password = serializers.CharField(
        write_only=True,
        trim_whitespace=False,
        style={"input_type": "password"},
        help_text="Password for HTTP Basic authentication and the admin; never returned.",
    )
    token = serializers.SerializerMethodField(
        help_text="API token for the `Authorization: Token <key>` header; only in your own user."
    )

    class Meta:
        model = User
        fields = [
            "id",
            "username",
            "first_name",
            "last_name",
            "email",
            "actor",
            "client",
            "message_endpoint",
            "token",
            "password",
        ]
        read_only_fields = ["id"]
        extra_kwargs = {
            "message_endpoint": {
                "help_text": "http(s) URL that receives notifications as JSON POSTs; empty for "
                "a client that pulls its notifications."
            }
        }

    def get_token(self, user: User) -> str | None:
        if self.context.get("token_owner") != user.pk:
            return None
        token = self.context.get("token") or Token.objects.filter(user=user).first()
        return token.key if token is not None else None

    def validate_password(self, value: str) -> str:
        if value == "":
            raise serializers.ValidationError("The password must not be empty.")
        try:
            # Runs the validators in AUTH_PASSWORD_VALIDATORS (none unless an operator adds some).
            validate_password(value)
        except DjangoValidationError as error:
            raise serializers.ValidationError(list(error.messages)) from None
        return value

    def validate_message_endpoint(self, value: str) -> str:
        if value == "":
            return value
        scheme = urlsplit(value).scheme.lower()
        if scheme not in {"http", "https"}:
            raise serializers.ValidationError(
                f"message_endpoint {value!r} uses the scheme {scheme!r}; use an http:// or "
                "https:// URL, or an empty string to pull notifications instead."
            )
        # Accept only what webhook delivery can contact, such as a port within 0-65535.
        problem = webhook.endpoint_problem(value)
        if problem is not None:
            raise serializers.ValidationError(
                f"message_endpoint {value!r} cannot be used: {problem}. Send a valid http:// "
                "or https:// URL, or an empty string to pull notifications instead."
            )
        return value

    def create(self, validated_data: dict[str, Any]) -> User:
        """Create a user without staff or superuser rights, together with its API token."""
        password = validated_data.pop("password")
        with transaction.atomic():
            user = User.objects.create_user(
                **validated_data, password=password, is_staff=False, is_superuser=False
            )
            Token.objects.create(user=user)
        return user


class GroupSerializer(serializers.ModelSerializer[Group]):
    """A group of users; `members` lists user ids."""

    members = serializers.PrimaryKeyRelatedField(
        source="user_set",
        many=True,
        required=False,
        queryset=User.objects.all(),
        help_text="Ids of the users in the group; left unchanged when omitted.",
    )

    class Meta:
        model = Group
        fields = ["id", "name", "members"]
        read_only_fields = ["id"]

    def create(self, validated_data: dict[str, Any]) -> Group:
        members = validated_data.pop("user_set", [])
        group = Group.objects.create(**validated_data)
        group.user_set.set(members)
        return group

    def update(self, group: Group, validated_data: dict[str, Any]) -> Group:
        members = validated_data.pop("user_set", None)
        for name, value in validated_data.items():
            setattr(group, name, value)
        group.save()
        if members is not None:
            group.user_set.set(members)
        return group


class GroupSummarySerializer(serializers.ModelSerializer[Group]):
    class Meta:
        model = Group
        fields = ["id", "name"]
