"""The caller's notification feed, for participants that pull instead of receiving webhooks."""

from __future__ import annotations

import math

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedserve.api.serializers.fields import shortened
from fedserve.core.models import Notification
from fedserve.notify import feed

# Largest value a BIGINT primary key can hold, on both SQLite and PostgreSQL.
_MAX_SEQ = 2**63 - 1


class FeedNotificationSerializer(serializers.ModelSerializer[Notification]):
    seq = serializers.IntegerField(
        source="id", help_text="Sequence number; pass the last one seen as `after`."
    )
    training_uuid = serializers.UUIDField(source="training_id", allow_null=True)

    class Meta:
        model = Notification
        fields = ["seq", "notification_type", "training_uuid", "body", "created_at"]


class MyNotifications(APIView):
    """GET returns the caller's notifications after a sequence number, waiting for new ones."""

    @extend_schema(
        summary="Pull the caller's notifications",
        description=(
            "Returns the caller's notifications with a sequence number above `after`, oldest "
            f"first, at most {feed.PAGE_SIZE} per request; ask again with the last `seq` to "
            "read the next page. When there are none, the request waits up to `wait` seconds "
            "and returns as soon as one arrives, or returns an empty list when the time is up. "
            "Every notification is listed here, whether or not it was also posted to the "
            "caller's message endpoint."
        ),
        parameters=[
            OpenApiParameter(
                "after",
                OpenApiTypes.INT,
                description="Return only notifications with a larger `seq`; 0 returns all.",
                default=0,
            ),
            OpenApiParameter(
                "wait",
                OpenApiTypes.NUMBER,
                description=(
                    "Seconds to wait when there is no notification yet; values above "
                    f"{feed.MAX_WAIT_SECONDS:.0f} are treated as {feed.MAX_WAIT_SECONDS:.0f}."
                ),
                default=0,
            ),
        ],
        responses={
            200: FeedNotificationSerializer(many=True),
            400: OpenApiResponse(description="`after` or `wait` is not a non-negative number."),
            401: OpenApiResponse(description="Missing or invalid credentials."),
        },
    )
    def get(self, request: Request) -> Response:
        after = _parse_after(request.query_params.get("after"))
        wait = _parse_wait(request.query_params.get("wait"))
        page = feed.wait_for_notifications(request.user.pk, after, wait)
        return Response(FeedNotificationSerializer(page, many=True).data)


def _parse_after(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_SEQ:
        raise ParseError(
            f"Query parameter 'after' must be a non-negative integer, got {shortened(raw)}. "
            "Pass the `seq` of the last notification you read, or 0 for all."
        )
    return value


def _parse_wait(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ParseError(
            "Query parameter 'wait' must be a non-negative number of seconds, "
            f"got {shortened(raw)}. "
            f"Values above {feed.MAX_WAIT_SECONDS:.0f} wait {feed.MAX_WAIT_SECONDS:.0f} seconds."
        )
    return min(value, feed.MAX_WAIT_SECONDS)
