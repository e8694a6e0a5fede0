"""Post one notification to a message endpoint: timeouts on connect and read, no redirects.

Only http and https URLs are contacted. The session ignores proxy variables and .netrc
files from the environment, so a notification goes straight to the endpoint and carries
no credentials other than those written in the endpoint URL itself.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

import fedserve


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST, with the status code and a reason for the log."""

    outcome: Outcome
    status_code: int | None
    reason: str
    elapsed_seconds: float


def endpoint_problem(endpoint: str) -> str | None:
    """Return why `endpoint` cannot be contacted, or None when it is a usable http(s) URL."""
    try:
        parts = urlsplit(endpoint)
        hostname = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a port outside 0-65535)
    except ValueError as error:
        return f"the message endpoint is not a valid URL ({error})"
    if parts.scheme not in ("http", "https"):
        return f"the message endpoint scheme {parts.scheme!r} is not http or https"
    if not hostname:
        return "the message endpoint has no host name"
    return None


def loggable_endpoint(endpoint: str) -> str:
    """Return the scheme, host and port of an endpoint, leaving out path and user info.

    Both may contain secrets, such as a token.
    """
    try:
        parts = urlsplit(endpoint)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


def post_notification(
    endpoint: str, payload: dict[str, Any], *, connect_timeout: float, read_timeout: float
) -> Attempt:
    """POST `payload` as JSON and classify the response: 2xx accepted, 4xx rejected, else failed.

    The read timeout applies to each wait for data from the endpoint, so it bounds the wait
    for the response headers. The response body is never read.
    NOTE: an endpoint that sends its headers a few bytes at a time can stretch one attempt
    beyond the read timeout.
    """
    started = time.monotonic()
    problem = endpoint_problem(endpoint)
    if problem is not None:
        return Attempt(Outcome.FAILED, None, problem, 0.0)

    with requests.Session() as session:
        session.trust_env = False
        try:
            response = session.post(
                endpoint,
                json=payload,
                timeout=(connect_timeout, read_timeout),
                allow_redirects=False,
                stream=True,
                headers={"User-Agent": f"fedserve/{fedserve.__version__}"},
            )
        except requests.ConnectTimeout:
            reason = f"connecting timed out after {connect_timeout} s"
            return Attempt(Outcome.FAILED, None, reason, time.monotonic() - started)
        except requests.ReadTimeout:
            reason = f"no answer within {read_timeout} s"
            return Attempt(Outcome.FAILED, None, reason, time.monotonic() - started)
        except requests.RequestException as error:
            reason = f"network error: {_root_cause(error)}"
            return Attempt(Outcome.FAILED, None, reason, time.monotonic() - started)
        status_code = response.status_code
        response.close()

    elapsed = time.monotonic() - started
    if 200 <= status_code < 300:
        return Attempt(Outcome.ACCEPTED, status_code, f"HTTP {status_code}", elapsed)
    if 400 <= status_code < 500:
        return Attempt(Outcome.REJECTED, status_code, f"HTTP {status_code}", elapsed)
    if 300 <= status_code < 400:
        reason = (
            f"HTTP {status_code} redirect, which is not followed; "
            "the message endpoint must be the final URL"
        )
        return Attempt(Outcome.FAILED, status_code, reason, elapsed)
    return Attempt(Outcome.FAILED, status_code, f"HTTP {status_code}", elapsed)


def _root_cause(error: BaseException) -> str:
    """Describe the innermost cause of a requests error without the URL it was sent to."""
    cause: BaseException = error
    while True:
        inner = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    if isinstance(cause, OSError) and cause.strerror:
        return f"{type(cause).__name__}: {cause.strerror}"
    if cause is error:
        return type(error).__name__
    # urllib3 messages begin with the connection object's repr, then a colon and the reason.
    return f"{type(cause).__name__}: {str(cause).rsplit(': ', 1)[-1]}"
