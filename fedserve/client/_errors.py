"""Errors raised by the participant SDK.

FedserveError            any failed call; `status` is None when no HTTP response arrived
├── TransportError       the server was unreachable or timed out after every retry
├── ClientError          a 4xx response: the request was wrong and retrying will not help
│   ├── AuthenticationError   401
│   ├── PermissionDeniedError 403
│   ├── NotFoundError         404
│   └── ConflictError         409, for example a second update for the same round
└── ServerError          a 5xx response that persisted through the retries
"""

from __future__ import annotations

from typing import Any


class FedserveError(Exception):
    """A failed call to a fedserve server, with the HTTP status and the server's message."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str = "",
        url: str = "",
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.method = method
        self.url = url
        self.body = body

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.method} {self.url} returned {self.status}: {self.message}"


class TransportError(FedserveError):
    """No HTTP response: the connection failed or timed out on every attempt."""


class ClientError(FedserveError):
    """The server rejected the request (4xx)."""


class AuthenticationError(ClientError):
    """Missing or wrong credentials (401)."""


class PermissionDeniedError(ClientError):
    """The caller is authenticated but not allowed to do this (403)."""


class NotFoundError(ClientError):
    """The object does not exist or is not visible to the caller (404)."""


class ConflictError(ClientError):
    """The request conflicts with the server's state (409)."""


class ServerError(FedserveError):
    """The server failed (5xx) on every attempt."""


_CLIENT_ERRORS: dict[int, type[ClientError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
}


def error_for_status(status: int) -> type[FedserveError]:
    """Return the exception class for an HTTP error status."""
    if status >= 500:
        return ServerError
    return _CLIENT_ERRORS.get(status, ClientError)


def message_from_body(body: Any, fallback: str) -> str:
    """Return the readable message of an error body such as {"detail": "..."} or field errors."""
    if isinstance(body, dict):
        if isinstance(body.get("detail"), str):
            return body["detail"]
        parts = []
        for field, errors in body.items():
            text = "; ".join(str(e) for e in errors) if isinstance(errors, list) else str(errors)
            parts.append(f"{field}: {text}")
        if parts:
            return " ".join(parts)
    if isinstance(body, list) and body:
        return "; ".join(str(item) for item in body)
    # An HTML error page (from a proxy or Django's own 500 page) is no message to show.
    if isinstance(body, str) and body.strip() and not body.lstrip().startswith("<"):
        return body.strip()[:500]
    return fallback
