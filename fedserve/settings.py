"""Django settings for fedserve, built from environment variables only (see fedserve.config)."""

from __future__ import annotations

import os

import dj_database_url

from fedserve import config

DATA_DIR = config.data_dir()
PRODUCTION = config.is_production()
SECRET_KEY = config.secret_key()
DEBUG = config.env_bool("FEDSERVE_DEBUG", False)
if PRODUCTION and DEBUG:
    raise config.ConfigurationError(
        "FEDSERVE_DEBUG=true is not allowed with FEDSERVE_PRODUCTION=true; unset FEDSERVE_DEBUG."
    )

ALLOWED_HOSTS = config.env_list("FEDSERVE_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = config.env_list("FEDSERVE_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "fedserve.core",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ (admin and API docs assets) from the installed apps under any server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "fedserve.urls"
WSGI_APPLICATION = "fedserve.wsgi.application"
AUTH_USER_MODEL = "core.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite in the data dir unless DATABASE_URL names another server.
_default_db = f"sqlite:///{DATA_DIR / 'fedserve.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(os.environ.get("DATABASE_URL", _default_db))}
except ValueError as error:
    raise config.ConfigurationError(
        f"DATABASE_URL={os.environ.get('DATABASE_URL')!r} is invalid ({error}); use a URL such "
        "as postgres://user@127.0.0.1:5432/fedserve, or unset it for SQLite in the data dir."
    ) from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take the write lock when they begin, so two requests cannot both
    # read a round as open and then both switch it (SQLite has no SELECT ... FOR UPDATE).
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Each thread keeps its connection for 60 s, because opening one and reading the schema
    # again took about as long as the queries of a whole webhook delivery.
    DATABASES["default"]["CONN_MAX_AGE"] = 60
else:
    # A new connection per request and task. Persistent connections would keep one open per
    # gunicorn thread (FEDSERVE_THREADS) and per worker process, which passes PostgreSQL's
    # default max_connections of 100 with a few processes. A pooler such as PgBouncer in
    # front of the database reuses connections instead.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
EMBEDDED_DATABASE = "DATABASE_URL" not in os.environ

# Model store: a local folder by default, or an S3-compatible bucket.
MODEL_STORAGE = os.environ.get("FEDSERVE_STORAGE", "local")
if MODEL_STORAGE == "local":
    _model_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(DATA_DIR / "models"), "file_permissions_mode": 0o600},
    }
elif MODEL_STORAGE == "s3":
    _model_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": os.environ.get("FEDSERVE_S3_BUCKET", "fedserve-models"),
            "endpoint_url": os.environ.get("FEDSERVE_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("FEDSERVE_S3_REGION") or None,
            "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "file_overwrite": True,
            "default_acl": None,
            "querystring_auth": True,
            # Reading a stored file spools it to FILE_UPLOAD_TEMP_DIR beyond 16 MiB; the
            # default (0) keeps the whole object in memory.
            "max_memory_size": 16 * 1024 * 1024,
        },
    }
else:
    raise config.ConfigurationError(
        f"FEDSERVE_STORAGE={MODEL_STORAGE!r} is unknown; use 'local' or 's3'."
    )
STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(DATA_DIR / "media")},
    },
    "models": _model_storage,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Uploads: files are spooled to disk in the data dir, never held in memory.
FEDSERVE_MAX_UPLOAD_BYTES = config.env_int("FEDSERVE_MAX_UPLOAD_BYTES", 4 * 1024**3, minimum=1024)
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "tmp")
os.makedirs(FILE_UPLOAD_TEMP_DIR, exist_ok=True)
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
DATA_UPLOAD_MAX_MEMORY_SIZE = 16 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FIELDS = 100_000

FEDSERVE_OPEN_REGISTRATION = config.env_bool("FEDSERVE_OPEN_REGISTRATION", True)
FEDSERVE_ALLOW_PICKLED_MODULES = config.env_bool("FEDSERVE_ALLOW_PICKLED_MODULES", False)
FEDSERVE_WEIGHTS_ONLY_UPDATES = config.env_bool("FEDSERVE_WEIGHTS_ONLY_UPDATES", False)
FEDSERVE_BASIC_AUTH_CACHE_SECONDS = config.env_int("FEDSERVE_BASIC_AUTH_CACHE_SECONDS", 60)

# Background work: Celery on a broker when CELERY_BROKER_URL is set, in-process otherwise.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "")
if PRODUCTION and not CELERY_BROKER_URL:
    raise config.ConfigurationError(
        "CELERY_BROKER_URL must be set in production mode, for example redis://127.0.0.1:6379/0."
    )

# Webhook delivery of notifications: timeouts per attempt, attempts per notification, and
# the exponential backoff between attempts (doubling from BACKOFF up to MAX_BACKOFF).
FEDSERVE_WEBHOOK_CONNECT_TIMEOUT_SECONDS = config.env_int(
    "FEDSERVE_WEBHOOK_CONNECT_TIMEOUT_SECONDS", 5, minimum=1
)
FEDSERVE_WEBHOOK_TIMEOUT_SECONDS = config.env_int("FEDSERVE_WEBHOOK_TIMEOUT_SECONDS", 30, minimum=1)
FEDSERVE_WEBHOOK_MAX_ATTEMPTS = config.env_int("FEDSERVE_WEBHOOK_MAX_ATTEMPTS", 10, minimum=1)
FEDSERVE_WEBHOOK_BACKOFF_SECONDS = config.env_int("FEDSERVE_WEBHOOK_BACKOFF_SECONDS", 2, minimum=1)
FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS = config.env_int(
    "FEDSERVE_WEBHOOK_MAX_BACKOFF_SECONDS", 300, minimum=1
)

STATIC_URL = "static/"
STATIC_ROOT = str(DATA_DIR / "static")
# WhiteNoise finds static files in the installed apps, so no collectstatic step is needed;
# it still reads STATIC_ROOT and warns when the folder is missing.
WHITENOISE_USE_FINDERS = True
os.makedirs(STATIC_ROOT, exist_ok=True)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "fedserve.api.authentication.TokenAuthentication",
        "fedserve.api.authentication.BasicAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "fedserve.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "fedserve API",
    "DESCRIPTION": "Federated-learning orchestration server for PyTorch models.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # A null validatorUrl keeps Swagger UI from sending the schema to an online validator.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "COMPONENT_SPLIT_REQUEST": True,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("FEDSERVE_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
    },
}
