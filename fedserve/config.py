"""Readers for fedserve's environment variables; every variable is documented in the README."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class ConfigurationError(RuntimeError):
    """Raised when an environment variable is missing or invalid."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean variable written as 1/0, true/false, yes/no or on/off."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use true or false.")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    """Read an integer variable that must be at least `minimum`."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer.") from None
    if value < minimum:
        raise ConfigurationError(f"{name}={value} is below the minimum {minimum}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    """Read a comma-separated list."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def data_dir() -> Path:
    """Return the data directory, creating it on first use."""
    path = Path(os.environ.get("FEDSERVE_DATA_DIR", "./fedserve-data")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_production() -> bool:
    """Tell whether fedserve runs in production mode (FEDSERVE_PRODUCTION)."""
    return env_bool("FEDSERVE_PRODUCTION", False)


def secret_key() -> str:
    """Return the secret key: from the environment, or kept in the data dir on the embedded default.

    Production mode requires FEDSERVE_SECRET_KEY and rejects short or placeholder values.
    """
    key = os.environ.get("FEDSERVE_SECRET_KEY", "")
    if is_production():
        # Fewer than 5 distinct characters is Django's own test for a weak key (security.W009).
        weak = len(key) < 32 or len(set(key)) < 5
        if weak or "insecure" in key or key.lower() in {"changeme", "secret"}:
            raise ConfigurationError(
                "FEDSERVE_SECRET_KEY must be set to a random value of at least 32 characters "
                "in production mode; generate one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
            )
        return key
    if key:
        return key
    path = data_dir() / "secret_key"
    if not path.exists():
        # Create with owner-only permissions so other local users cannot read the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()
