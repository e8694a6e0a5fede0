"""Settings for the test run: fedserve's own, with a throw-away data directory."""

import os
import tempfile

os.environ.setdefault("FEDSERVE_DATA_DIR", tempfile.mkdtemp(prefix="fedserve-test-"))

from fedserve.settings import *  # noqa: F403

# Fast hashing keeps user fixtures cheap; production keeps Django's default hashers.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# A file, not SQLite's shared in-memory database: concurrency tests open one connection per
# thread, and shared-cache memory databases fail concurrent writers at once ("database table
# is locked") instead of waiting for the lock as the embedded server's file database does.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(DATA_DIR, "test.sqlite3")}  # noqa: F405
