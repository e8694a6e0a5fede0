import base64
import time

import pytest

from fedserve.client import (
    AuthenticationError,
    Client,
    ClientError,
    ConflictError,
    FedserveError,
    NotFoundError,
    PermissionDeniedError,
    ServerError,
    TransportError,
)
from fedserve.client._http import Transport
from tests.client.fakes import ScriptedServer
from tests.client.server import free_port


def test_retry_on_5xx_then_success():
    server = ScriptedServer([(503, {"detail": "busy"}), (502, None), (200, {"id": "u1"})])
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01)
        assert client.myself() == {"id": "u1"}
    assert len(server.requests) == 3
    assert all(r["path"] == "/api/users/myself/" for r in server.requests)


def test_5xx_after_retries_raises_server_error():
    server = ScriptedServer([(500, {"detail": "boom"})] * 3)
    with server.running():
        client = Client(server.url, token="t0k", retries=2, backoff=0.01)
        with pytest.raises(ServerError) as caught:
            client.myself()
    assert caught.value.status == 500
    assert caught.value.message == "boom"
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, ClientError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, ClientError),
    ],
)
def test_4xx_maps_to_error_class_without_retry(status, error_class):
    server = ScriptedServer([(status, {"detail": f"status {status} message"})])
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01)
        with pytest.raises(error_class) as caught:
            client.get_training("0a0a0a0a-0000-0000-0000-000000000000")
    assert caught.value.status == status
    assert caught.value.message == f"status {status} message"
    assert isinstance(caught.value, ClientError)
    assert len(server.requests) == 1


def test_field_errors_become_message():
    server = ScriptedServer([(400, {"sample_size": ["must be positive"], "round": ["missing"]})])
    with server.running():
        client = Client(server.url, token="t0k")
        with pytest.raises(ClientError) as caught:
            client.get_training("x")
    assert caught.value.message == "sample_size: must be positive round: missing"
    assert caught.value.body == {"sample_size": ["must be positive"], "round": ["missing"]}
    assert "returned 400" in str(caught.value)


def test_unreachable_server_raises_transport_error():
    url = f"http://127.0.0.1:{free_port()}"
    client = Client(url, token="t0k", retries=2, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        client.myself()
    assert caught.value.status is None
    assert isinstance(caught.value, FedserveError)
    assert "3 attempts" in str(caught.value)
    assert time.monotonic() - started < 5


def test_token_sent_as_header():
    server = ScriptedServer([(200, {})])
    with server.running():
        Client(server.url, token="secret-token").myself()
    assert server.requests[0]["headers"]["Authorization"] == "Token secret-token"


def test_basic_auth_with_password():
    server = ScriptedServer([(200, {})])
    with server.running():
        Client(server.url, username="alice", password="pw:1").myself()
    expected = "Basic " + base64.b64encode(b"alice:pw:1").decode()
    assert server.requests[0]["headers"]["Authorization"] == expected


def test_base_url_with_api_suffix():
    transport = Transport("http://127.0.0.1:8000/api/")
    assert transport.url("users/") == "http://127.0.0.1:8000/api/users/"


def test_base_url_without_scheme_rejected():
    with pytest.raises(ValueError, match="http://"):
        Client("127.0.0.1:8000")


def test_username_without_password_rejected():
    with pytest.raises(ValueError, match="both username and password"):
        Client("http://127.0.0.1:8000", username="alice")


def test_upload_update_rejects_bad_sample_size():
    client = Client("http://127.0.0.1:9", token="t")
    with pytest.raises(ValueError, match="sample_size"):
        client.upload_update("m", {}, round=0, sample_size=0)


def test_html_error_page_becomes_reason():
    server = ScriptedServer([(404, "<html><body>Not Found</body></html>")])
    with server.running():
        client = Client(server.url, token="t0k")
        with pytest.raises(NotFoundError) as caught:
            client.myself()
    assert caught.value.message == "Not Found"
