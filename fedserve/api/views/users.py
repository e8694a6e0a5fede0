"""Users: registration, the user list, one's own user, groups and trainings."""

from __future__ import annotations

from typing import cast

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.authtoken.models import Token
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve.api import permissions
from fedserve.api.serializers.trainings import TrainingSerializer
from fedserve.api.serializers.users import GroupSummarySerializer, UserSerializer
from fedserve.core.models import User

_UNAUTHENTICATED = OpenApiResponse(description="Missing or invalid credentials.")


class UserListCreate(APIView):
    """GET lists all users; POST registers a new user."""

    def get_permissions(self):  # type: ignore[no-untyped-def]
        # Registration is open to anonymous callers; permissions.require_registration_open
        # decides whether it is allowed.
        if self.request.method == "POST":
            return [AllowAny()]
        return super().get_permissions()

    @extend_schema(
        summary="List users",
        responses={200: UserSerializer(many=True), 401: _UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        users = User.objects.order_by("username")
        serializer = UserSerializer(users, many=True, context={"token_owner": request.user.pk})
        return Response(serializer.data)

    @extend_schema(
        summary="Register a user",
        description="Creates a user and its API token. Staff and superuser rights are never "
        "granted here. Answers 403 when registration is switched off.",
        request=UserSerializer,
        responses={
            201: UserSerializer,
            400: OpenApiResponse(description="Invalid or missing fields."),
            401: OpenApiResponse(
                description="Credentials were sent but are invalid; register without any."
            ),
            403: OpenApiResponse(description="Registration is closed on this server."),
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        permissions.require_registration_open(request.user)
        serializer = UserSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = serializer.save()
        body = UserSerializer(user, context={"token_owner": user.pk}).data
        return Response(body, status=status.HTTP_201_CREATED)


class Myself(APIView):
    @extend_schema(
        summary="Your own user, with your API token",
        description="Creates the token first if the user has none (as for a user made with "
        "`fedserve manage createsuperuser`).",
        responses={200: UserSerializer, 401: _UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        user = cast(User, request.user)
        if isinstance(request.auth, Token):
            token = request.auth
        else:
            token, _created = Token.objects.get_or_create(user=user)
        serializer = UserSerializer(user, context={"token_owner": user.pk, "token": token})
        return Response(serializer.data)


class UserDetail(APIView):
    @extend_schema(
        summary="One user",
        description="`token` is present only when the user is the caller.",
        responses={
            200: UserSerializer,
            401: _UNAUTHENTICATED,
            404: OpenApiResponse(description="No user has this id."),
        },
    )
    def get(self, request: Request, id: str) -> Response:
        user = get_object_or_404(User, pk=id)
        return Response(UserSerializer(user, context={"token_owner": request.user.pk}).data)


class MyGroups(APIView):
    @extend_schema(
        summary="Your groups",
        responses={200: GroupSummarySerializer(many=True), 401: _UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        groups = request.user.groups.order_by("name")
        return Response(GroupSummarySerializer(groups, many=True).data)


class MyTrainings(APIView):
    @extend_schema(
        summary="Trainings you act in or take part in",
        responses={200: TrainingSerializer(many=True), 401: _UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        trainings = (
            permissions.trainings_involving(request.user)
            .select_related("model")
            .order_by("created_at")
        )
        return Response(TrainingSerializer(trainings, many=True).data)
