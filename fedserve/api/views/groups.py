"""Groups of users: superusers list them all, any user creates one, members manage it."""

from __future__ import annotations

from typing import cast

from django.contrib.auth.models import Group
from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve.api import permissions
from fedserve.api.serializers.users import GroupSerializer
from fedserve.core.models import User

_UNAUTHENTICATED = OpenApiResponse(description="Missing or invalid credentials.")
_NOT_MEMBER = OpenApiResponse(description="You are not a member of the group.")
_NOT_FOUND = OpenApiResponse(description="No group has this id.")
_INVALID = OpenApiResponse(description="Invalid fields, such as a name already in use.")


class GroupListCreate(APIView):
    @extend_schema(
        summary="List all groups (superusers only)",
        description="Other users see their own groups at users/groups/.",
        responses={
            200: GroupSerializer(many=True),
            401: _UNAUTHENTICATED,
            403: OpenApiResponse(description="You are not a superuser."),
        },
    )
    def get(self, request: Request) -> Response:
        permissions.require_list_groups(request.user)
        groups = Group.objects.order_by("name").prefetch_related("user_set")
        return Response(GroupSerializer(groups, many=True).data)

    @extend_schema(
        summary="Create a group",
        description="The caller becomes a member of the new group.",
        request=GroupSerializer,
        responses={201: GroupSerializer, 400: _INVALID, 401: _UNAUTHENTICATED},
    )
    def post(self, request: Request) -> Response:
        serializer = GroupSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            group = serializer.save()
            group.user_set.add(cast(User, request.user))
        return Response(GroupSerializer(group).data, status=status.HTTP_201_CREATED)


class GroupDetail(APIView):
    def _group(self, request: Request, id: int) -> Group:
        group = get_object_or_404(Group, pk=id)
        permissions.require_group_member(request.user, group)
        return group

    @extend_schema(
        summary="One group",
        responses={
            200: GroupSerializer,
            401: _UNAUTHENTICATED,
            403: _NOT_MEMBER,
            404: _NOT_FOUND,
        },
    )
    def get(self, request: Request, id: int) -> Response:
        return Response(GroupSerializer(self._group(request, id)).data)

    @extend_schema(
        summary="Replace a group's name and members",
        request=GroupSerializer,
        responses={
            200: GroupSerializer,
            400: _INVALID,
            401: _UNAUTHENTICATED,
            403: _NOT_MEMBER,
            404: _NOT_FOUND,
        },
    )
    def put(self, request: Request, id: int) -> Response:
        return self._update(request, id, partial=False)

    @extend_schema(
        summary="Change a group's name or members",
        request=GroupSerializer,
        responses={
            200: GroupSerializer,
            400: _INVALID,
            401: _UNAUTHENTICATED,
            403: _NOT_MEMBER,
            404: _NOT_FOUND,
        },
    )
    def patch(self, request: Request, id: int) -> Response:
        return self._update(request, id, partial=True)

    @extend_schema(
        summary="Delete a group",
        responses={204: None, 401: _UNAUTHENTICATED, 403: _NOT_MEMBER, 404: _NOT_FOUND},
    )
    def delete(self, request: Request, id: int) -> Response:
        self._group(request, id).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _update(self, request: Request, id: int, *, partial: bool) -> Response:
        group = self._group(request, id)
        serializer = GroupSerializer(group, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            group = serializer.save()
        return Response(GroupSerializer(group).data)
