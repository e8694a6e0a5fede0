"""The `fedserve` command's handling of invalid configuration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FEDSERVE_WORKERS", "abc", "FEDSERVE_WORKERS='abc' is not an integer"),
        ("FEDSERVE_LOG_LEVEL", "loud", "FEDSERVE_LOG_LEVEL='loud' is not a log level"),
        ("DATABASE_URL", "nonsense", "DATABASE_URL='nonsense' is invalid"),
        ("FEDSERVE_PRODUCTION", "maybe", "FEDSERVE_PRODUCTION='maybe' is not a boolean"),
    ],
)
def test_invalid_configuration_exits_with_one_line(tmp_path, variable, value, message):
    env = {**os.environ, "FEDSERVE_DATA_DIR": str(tmp_path), variable: value}
    env.pop("DJANGO_SETTINGS_MODULE", None)

    completed = subprocess.run(
        [sys.executable, "-m", "fedserve", "manage", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert completed.returncode == 1
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
