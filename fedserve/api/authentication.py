"""Authentication schemes: token header, Basic with password or token, and browser session.

Basic authentication with a password would otherwise cost a full password hash (hundreds of
milliseconds by design) on every request. Verified credentials are therefore remembered for
a short time, keyed by an HMAC of username and password under the server's secret key, so
the cache never contains a password or anything from which one can be recovered cheaply.
Each entry also records the user's password hash at verification time: after a password
change the stored hash differs, so the old password stops working at once.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

_CACHE_MAX_ENTRIES = 10_000


class _VerifiedCredentials:
    """A thread-safe map from credential digest to (user id, password hash, expiry)."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[Any, str, float]] = {}
        self._lock = threading.Lock()

    def digest(self, username: str, password: str) -> bytes:
        message = f"{len(username)}:{username}:{password}".encode()
        return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).digest()

    def get(self, key: bytes) -> tuple[Any, str] | None:
        """Return (user id, password hash) for a digest verified less than the TTL ago."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            user_id, password_hash, expires = entry
            if expires < time.monotonic():
                del self._entries[key]
                return None
            return user_id, password_hash

    def put(self, key: bytes, user_id: Any, password_hash: str) -> None:
        ttl = settings.FEDSERVE_BASIC_AUTH_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= _CACHE_MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (user_id, password_hash, time.monotonic() + ttl)

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


verified_credentials = _VerifiedCredentials()


def _reject_nul(value: str) -> None:
    # PostgreSQL rejects NUL characters in text parameters with an error, not a miss.
    if "\x00" in value:
        raise exceptions.AuthenticationFailed("Invalid credentials: they contain a NUL character.")


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, with the user loaded in the same query as the token.

    As the first authentication class, its `WWW-Authenticate: Token` challenge makes DRF
    return 401 (not 403) when credentials are missing or wrong.
    """

    def authenticate(self, request: Request) -> tuple[Any, Token] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != b"bearer":
            return super().authenticate(request)
        # Many HTTP clients send a token as "Bearer"; the same key works under that scheme.
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Bearer header: send 'Authorization: Bearer <token>' with one token."
            )
        try:
            key = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(
                "Invalid Bearer header: a token contains only ASCII letters and digits."
            ) from None
        return self.authenticate_credentials(key)

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        _reject_nul(key)
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
        _reject_nul(userid)
        _reject_nul(password)
        if password == "":
            return self._authenticate_token(userid), None

        key = verified_credentials.digest(userid, password)
        cached = verified_credentials.get(key)
        if cached is not None:
            user_id, password_hash = cached
            user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
            if (
                user is not None
                and user.get_username() == userid
                and hmac.compare_digest(user.password, password_hash)
            ):
                return user, None
            # The password or username changed, or the user was deactivated: verify again.
            verified_credentials.discard(key)

        user = authenticate(request=request, username=userid, password=password)
        if user is None:
            raise exceptions.AuthenticationFailed("Invalid username or password.")
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        verified_credentials.put(key, user.pk, user.password)
        return user, None

    def _authenticate_token(self, key: str) -> Any:
        try:
            user, _token = TokenAuthentication().authenticate_credentials(key)
        except exceptions.AuthenticationFailed:
            raise exceptions.AuthenticationFailed(
                "Invalid Basic credentials: with an empty password the username must be an "
                "API token; send a username and password or a valid token."
            ) from None
        return user


class BasicAuthenticationScheme(OpenApiAuthenticationExtension):
    """OpenAPI security scheme of `BasicAuthentication`."""

    target_class = BasicAuthentication
    name = "basicAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "basic",
            "description": "Username and password, or the API token as username with an "
            "empty password.",
        }
