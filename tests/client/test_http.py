import base64
import time

import pytest
import requests

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
from tests.client.fakes import (
    CLOSE_AFTER_BODY,
    CLOSE_ON_ARRIVAL,
    RESPOND,
    ConnectionScript,
    ScriptedServer,
)
from tests.client.server import free_port
from tests.factories import TinyNet


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


# Uploads that lost their connection or their response


UPDATE_PATH = "/api/models/m1/"
DUPLICATE_UPDATE = {
    "detail": "You already sent an update of model m1 for round 3; wait for the next round."
}


def upload_tiny_update(client: Client) -> None:
    client.upload_update("m1", TinyNet().state_dict(), round=3, sample_size=10)


def test_upload_resent_after_keepalive_close():
    # The download leaves a kept-alive connection, and the server closes it just as the
    # upload arrives on it, so requests raises ConnectionError without any response.
    server = ConnectionScript(
        [
            [(RESPOND, 200, {"model": "bytes"}), (CLOSE_ON_ARRIVAL,)],
            [(RESPOND, 201, {"model_id": "l1"})],
        ]
    )
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01)
        client.download_model("m1")
        upload_tiny_update(client)
    assert [(r["connection"], r["complete"]) for r in server.requests] == [
        (0, True),
        (0, False),
        (1, True),
    ]
    assert server.requests[2]["method"] == "POST"
    assert server.requests[2]["path"] == UPDATE_PATH


def test_upload_conflict_after_lost_response_is_success(caplog):
    server = ConnectionScript([[(CLOSE_AFTER_BODY,)], [(RESPOND, 409, DUPLICATE_UPDATE)]])
    with server.running(), caplog.at_level("INFO", logger="fedserve.client"):
        client = Client(server.url, token="t0k", backoff=0.01)
        upload_tiny_update(client)
    assert [(r["connection"], r["method"]) for r in server.requests] == [
        (0, "POST"),
        (1, "POST"),
    ]
    # The multipart boundary differs between attempts, so compare lengths and the round.
    assert len(server.requests[0]["body"]) == len(server.requests[1]["body"])
    for request in server.requests:
        assert b'name="round"\r\n\r\n3\r\n' in request["body"]
    assert "an earlier attempt was stored" in caplog.text
    assert "uploaded update of model m1 for round 3" in caplog.text


def test_upload_conflict_after_5xx_is_success():
    server = ScriptedServer([(503, {"detail": "busy"}), (409, DUPLICATE_UPDATE)])
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01)
        upload_tiny_update(client)
    assert len(server.requests) == 2


def test_upload_conflict_on_first_attempt_raises():
    server = ScriptedServer([(409, DUPLICATE_UPDATE)])
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01)
        with pytest.raises(ConflictError) as caught:
            upload_tiny_update(client)
    assert caught.value.status == 409
    assert caught.value.message == DUPLICATE_UPDATE["detail"]
    assert len(server.requests) == 1


class RefusedOnce(requests.Session):
    """A session whose first request fails as a refused connection does, before sending."""

    def __init__(self) -> None:
        super().__init__()
        try:
            requests.get(f"http://127.0.0.1:{free_port()}/", timeout=5)
        except requests.ConnectionError as error:
            self.refusal: requests.ConnectionError | None = error
        else:
            raise AssertionError("a closed port accepted a connection")

    def request(self, *args, **kwargs):
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            raise refusal
        return super().request(*args, **kwargs)


def test_upload_conflict_after_refused_connection_raises():
    # A refused connection sent nothing, so the 409 of the next attempt is a real conflict.
    server = ScriptedServer([(409, DUPLICATE_UPDATE)])
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01, session=RefusedOnce())
        with pytest.raises(ConflictError):
            upload_tiny_update(client)
    assert len(server.requests) == 1


def test_conflict_after_lost_response_raises_outside_uploads():
    # Only uploads, whose duplicate the server reports as 409, take that 409 as success.
    server = ConnectionScript([[(CLOSE_AFTER_BODY,)], [(RESPOND, 409, {"detail": "in use"})]])
    with server.running():
        client = Client(server.url, token="t0k", backoff=0.01)
        with pytest.raises(ConflictError):
            client.start_training("t1")
    assert len(server.requests) == 2
