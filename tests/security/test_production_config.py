"""Production mode refuses to start with a weak secret key or with debug on."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

FEDSERVE = Path(sys.executable).with_name("fedserve")
GOOD_KEY = secrets.token_urlsafe(50)
KEY_MESSAGE = "FEDSERVE_SECRET_KEY must be set to a random value of at least 32 characters"
DEBUG_MESSAGE = "FEDSERVE_DEBUG=true is not allowed with FEDSERVE_PRODUCTION=true"


def manage_check(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """Run `fedserve manage check` in production mode with the given extra variables."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FEDSERVE_", "DJANGO_")) and name != "DATABASE_URL"
    }
    environment.update(
        FEDSERVE_PRODUCTION="true",
        FEDSERVE_DATA_DIR=str(tmp_path),
        # Only named so that the broker check passes; `check` does not connect to it.
        CELERY_BROKER_URL="redis://127.0.0.1:6379/0",
        **variables,
    )
    return subprocess.run(
        [str(FEDSERVE), "manage", "check"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "key",
    [
        "",
        "short",
        "changeme",
        "django-insecure-" + secrets.token_urlsafe(40),
        "a" * 64,
        "abab" * 16,
    ],
    ids=["missing", "short", "placeholder", "django default", "one character", "two characters"],
)
def test_weak_secret_key_stops_startup(tmp_path, key):
    result = manage_check(tmp_path, FEDSERVE_SECRET_KEY=key)

    assert result.returncode != 0
    assert KEY_MESSAGE in result.stderr
    assert "System check identified no issues" not in result.stdout


@pytest.mark.parametrize("value", ["true", "1", "yes", "on"])
def test_debug_stops_startup(tmp_path, value):
    result = manage_check(tmp_path, FEDSERVE_SECRET_KEY=GOOD_KEY, FEDSERVE_DEBUG=value)

    assert result.returncode != 0
    assert DEBUG_MESSAGE in result.stderr


def test_strong_key_without_debug_starts(tmp_path):
    result = manage_check(tmp_path, FEDSERVE_SECRET_KEY=GOOD_KEY, FEDSERVE_DEBUG="false")

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_secret_key_not_echoed_on_failure(tmp_path):
    weak = "weak-" + secrets.token_hex(4)

    result = manage_check(tmp_path, FEDSERVE_SECRET_KEY=weak)

    assert result.returncode != 0
    assert weak not in result.stderr
    assert weak not in result.stdout
