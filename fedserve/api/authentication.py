"""Authentication schemes: token header, Basic with password or token, and browser session.

Basic authentication with a password would otherwise cost a full password hash (hundreds of
milliseconds by design) on every request. Verified credentials are therefore remembered for
a short time, keyed by an HMAC of username and password under the server's secret key, so
the cache never contains a password or anything from which one can be recovered cheaply.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

_CACHE_MAX_ENTRIES = 10_000


class _VerifiedCredentials:
    """A thread-safe map from credential digest to (user id, expiry)."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def digest(self, username: str, password: str) -> bytes:
        message = f"{len(username)}:{username}:{password}".encode()
        return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).digest()

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            user_id, expires = entry
            if expires < time.monotonic():
                del self._entries[key]
                return None
            return user_id

    def put(self, key: bytes, user_id: Any) -> None:
        ttl = settings.FEDSERVE_BASIC_AUTH_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= _CACHE_MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (user_id, time.monotonic() + ttl)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


verified_credentials = _VerifiedCredentials()


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, with the user loaded in the same query as the token."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        try:
            token = Token.objects.select_related("user").get(key=key)
        except Token.DoesNotExist:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return token.user, token


class BasicAuthentication(authentication.BasicAuthentication):
    """HTTP Basic with username and password, or with the token as username and no password."""

    def authenticate_credentials(
        self, userid: str, password: str, request: Request | None = None
    ) -> tuple[Any, None]:
        if password == "":
            token_auth = TokenAuthentication()
            user, _token = token_auth.authenticate_credentials(userid)
            return user, None

        key = verified_credentials.digest(userid, password)
        user_id = verified_credentials.get(key)
        if user_id is not None:
            user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
            if user is not None:
                return user, None

        user = authenticate(request=request, username=userid, password=password)
        if user is None:
            raise exceptions.AuthenticationFailed("Invalid username or password.")
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        verified_credentials.put(key, user.pk)
        return user, None
