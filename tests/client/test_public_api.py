import subprocess
import sys

import fedserve.client


def test_public_names_pinned():
    assert fedserve.client.__all__ == [
        "AuthenticationError",
        "Client",
        "ClientError",
        "ConflictError",
        "FedserveError",
        "NotFoundError",
        "Notification",
        "NotificationType",
        "PermissionDeniedError",
        "ServerError",
        "TransportError",
        "WebhookReceiver",
    ]


def test_public_names_importable():
    for name in fedserve.client.__all__:
        assert getattr(fedserve.client, name) is not None


def test_sdk_imports_without_django():
    code = (
        "import sys\n"
        "import fedserve.client\n"
        "from fedserve.client import _client, _http, _participant, _serialization, _webhook\n"
        "loaded = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not loaded, loaded\n"
        "assert 'rest_framework' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
