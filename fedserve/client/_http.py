"""HTTP transport of the SDK: authentication, timeouts, retries with backoff, error mapping."""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import requests
from urllib3.exceptions import NewConnectionError

from fedserve.client._errors import (
    FedserveError,
    TransportError,
    error_for_status,
    message_from_body,
)

logger = logging.getLogger("fedserve.client")

# Files travel as (filename, bytes, content type), which requests encodes as multipart.
# NOTE: whole files are held in memory so that a retry can send them again; models of
# several gigabytes would need a streaming upload that the SDK does not have yet.
FileField = tuple[str, bytes, str]


class Transport:
    """Send requests below `<base_url>/api/`, retrying network failures and 5xx responses.

    A retried POST may reach the server twice when the first response was lost on the way
    back, for example when the server closed a kept-alive connection as the request
    arrived. The server rejects a second local update for the same round with 409, so
    uploads pass `conflict_after_retry_ok` to take that 409 as success.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, not {base_url!r}; "
                "use for example http://127.0.0.1:8000."
            )
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries!r}.")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/api"):
            self.base_url = self.base_url[: -len("/api")]
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.session = session or requests.Session()
        self._authorization: str | None = None
        self.set_credentials(token=token, username=username, password=password)

    def set_credentials(
        self, *, token: str | None = None, username: str | None = None, password: str | None = None
    ) -> None:
        """Use a token, or username and password (HTTP Basic), for the following requests."""
        if token:
            self._authorization = f"Token {token}"
        elif username is not None and password is not None:
            pair = f"{username}:{password}".encode()
            self._authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        elif username is not None or password is not None:
            raise ValueError("Give both username and password, or a token.")
        else:
            self._authorization = None

    def url(self, path: str) -> str:
        return f"{self.base_url}/api/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: Mapping[str, FileField] | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        authenticate: bool = True,
        conflict_after_retry_ok: bool = False,
    ) -> requests.Response:
        """Send one request and return the 2xx response, or raise a FedserveError.

        With `conflict_after_retry_ok`, a 409 is returned instead of raised when an earlier
        attempt may have been stored, because it got a 5xx or no response after the
        connection was made. A 409 on the first attempt still raises ConflictError.
        """
        url = self.url(path)
        headers = {"Accept": "application/json, application/octet-stream"}
        if authenticate and self._authorization:
            headers["Authorization"] = self._authorization
        timeout = self.timeout if timeout is None else timeout

        attempt = 0
        earlier_attempt_may_be_stored = False
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                response = self.session.request(
                    method,
                    url,
                    json=json,
                    data=data,
                    files=files,
                    params=params,
                    headers=headers,
                    timeout=timeout,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt > self.retries:
                    raise TransportError(
                        f"{method} {url} failed after {attempt} attempts: {exc}; check that "
                        "the server runs and the URL is right.",
                        method=method,
                        url=url,
                    ) from exc
                earlier_attempt_may_be_stored |= _may_have_reached_server(exc)
                delay = self._delay(attempt)
                logger.warning(
                    "%s %s failed (%s); retry %d of %d in %.1f s",
                    method,
                    url,
                    type(exc).__name__,
                    attempt,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
                continue

            elapsed = time.monotonic() - started
            logger.debug("%s %s -> %s in %.3f s", method, url, response.status_code, elapsed)
            if response.status_code < 400:
                return response
            if (
                response.status_code == 409
                and conflict_after_retry_ok
                and earlier_attempt_may_be_stored
            ):
                logger.info(
                    "%s %s returned 409 on attempt %d, so an earlier attempt was stored: %s",
                    method,
                    url,
                    attempt,
                    message_from_body(_json_or_text(response), "conflict"),
                )
                return response
            if response.status_code >= 500 and attempt <= self.retries:
                earlier_attempt_may_be_stored = True
                delay = self._delay(attempt)
                logger.warning(
                    "%s %s returned %s; retry %d of %d in %.1f s",
                    method,
                    url,
                    response.status_code,
                    attempt,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
                continue
            raise self._error(method, url, response)

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with full jitter, so that many participants do not retry in step.
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    @staticmethod
    def _error(method: str, url: str, response: requests.Response) -> FedserveError:
        body = _json_or_text(response)
        fallback = response.reason or f"HTTP {response.status_code}"
        error_class = error_for_status(response.status_code)
        return error_class(
            message_from_body(body, fallback),
            status=response.status_code,
            method=method,
            url=url,
            body=body,
        )

    def close(self) -> None:
        self.session.close()


def _json_or_text(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _may_have_reached_server(error: requests.RequestException) -> bool:
    """Tell whether a request that failed without a response may have reached the server.

    Only a failure to open the connection (refused, unreachable, connect timeout) proves
    that nothing was sent. A reset or closed connection, or a read timeout, does not.
    """
    if isinstance(error, requests.ConnectTimeout):
        return False
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return not isinstance(reason, NewConnectionError)
