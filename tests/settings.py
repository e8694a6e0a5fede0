"""Settings for the test run: fedserve's own, with a throw-away data directory."""

import os
import tempfile

os.environ.setdefault("FEDSERVE_DATA_DIR", tempfile.mkdtemp(prefix="fedserve-test-"))

from fedserve.settings import *  # noqa: F403

# Fast hashing keeps user fixtures cheap; production keeps Django's default hashers.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
