import socket

from fedserve.notify import webhook
from fedserve.notify.webhook import Outcome


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str) -> webhook.Attempt:
    return webhook.post_notification(url, {"a": 1}, connect_timeout=1.0, read_timeout=0.3)


def test_post_2xx_accepts(webhook_server):
    webhook_server.respond_with(204)
    attempt = _post(webhook_server.url)
    assert attempt.outcome is Outcome.ACCEPTED
    assert attempt.status_code == 204
    assert webhook_server.received[0].payload == {"a": 1}


def test_post_4xx_rejects(webhook_server):
    webhook_server.respond_with(410)
    assert _post(webhook_server.url).outcome is Outcome.REJECTED


def test_post_5xx_fails(webhook_server):
    webhook_server.respond_with(503)
    attempt = _post(webhook_server.url)
    assert attempt.outcome is Outcome.FAILED
    assert attempt.reason == "HTTP 503"


def test_post_redirect_not_followed(webhook_server):
    webhook_server.respond_with(307)
    attempt = _post(webhook_server.url)
    assert attempt.outcome is Outcome.FAILED
    assert "not followed" in attempt.reason
    assert [request.path for request in webhook_server.received] == ["/hook"]


def test_post_closed_port_fails():
    attempt = _post(f"http://127.0.0.1:{_closed_port()}/hook")
    assert attempt.outcome is Outcome.FAILED
    assert "refused" in attempt.reason.lower()
    assert "/hook" not in attempt.reason


def test_post_hanging_endpoint_times_out(webhook_server):
    webhook_server.respond_with("hang")
    attempt = _post(webhook_server.url)
    assert attempt.outcome is Outcome.FAILED
    assert attempt.reason == "no answer within 0.3 s"
    assert attempt.elapsed_seconds < 2.0


def test_post_sends_credentials_from_url(webhook_server):
    host_and_port = webhook_server.url.removeprefix("http://")
    attempt = _post(f"http://token123:@{host_and_port}")
    assert attempt.outcome is Outcome.ACCEPTED
    assert webhook_server.received[0].authorization is not None


def test_endpoint_problem_rejects_other_schemes():
    assert "'ftp'" in webhook.endpoint_problem("ftp://127.0.0.1/hook")
    assert "'file'" in webhook.endpoint_problem("file:///etc/passwd")
    assert "no host" in webhook.endpoint_problem("http:///hook")
    assert "not a valid URL" in webhook.endpoint_problem("http://127.0.0.1:99999/hook")
    assert webhook.endpoint_problem("https://127.0.0.1:8443/hook") is None


def test_post_other_scheme_never_connects(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no request may be sent")

    monkeypatch.setattr("requests.Session.post", fail)
    attempt = _post("ftp://127.0.0.1/hook")
    assert attempt.outcome is Outcome.FAILED
    assert "not http or https" in attempt.reason


def test_loggable_endpoint_drops_secrets():
    url = "http://user:secret@127.0.0.1:8080/hooks/abc?key=1"
    assert webhook.loggable_endpoint(url) == "http://127.0.0.1:8080"
