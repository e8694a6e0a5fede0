"""Bytes that are not UTF-8: in JSON bodies, form fields, file names, headers and query strings."""

from __future__ import annotations

import base64

import pytest
from rest_framework.test import APIClient

from fedserve.core.models import User
from tests.factories import client_for, torchscript_bytes

pytestmark = pytest.mark.django_db

BOUNDARY = "fuzzboundary"


def multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """Build a multipart body from (Content-Disposition header value, content) pairs."""
    body = b""
    for disposition, content in parts:
        body += f"--{BOUNDARY}\r\n".encode()
        body += b"Content-Disposition: form-data; " + disposition + b"\r\n\r\n" + content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def model_upload(name: bytes = b"net", field: bytes = b"name", filename: bytes = b"m.pt") -> bytes:
    return multipart(
        [
            (b'name="' + field + b'"', name),
            (b'name="description"', b"d"),
            (b'name="model_file"; filename="' + filename + b'"', torchscript_bytes()),
        ]
    )


def test_json_body_invalid_utf8_is_400(world, unchanged):
    unchanged()

    response = APIClient().post(
        "/api/users/",
        b'{"username": "ab\xff\xfe", "password": "a-long-password"}',
        content_type="application/json",
    )

    assert response.status_code == 400
    assert "can't decode byte 0xff" in response.json()["detail"]
    unchanged()


def test_json_body_declared_charset_is_used(world):
    # DRF decodes a JSON body with the charset the Content-Type names.
    body = '{"username": "andré", "password": "a-long-password"}'.encode("latin-1")

    response = APIClient().post(
        "/api/users/", body, content_type="application/json; charset=latin-1"
    )

    assert response.status_code == 201
    assert User.objects.filter(username="andré").exists()


def test_urlencoded_percent_escape_invalid_utf8_is_400(world, unchanged):
    unchanged()

    response = APIClient().post(
        "/api/users/",
        b"username=ab%FF&password=a-long-password",
        content_type="application/x-www-form-urlencoded",
    )

    # Django decodes the escape with errors="replace", and U+FFFD is not a username character.
    assert response.status_code == 400
    assert "username" in response.json()
    unchanged()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (model_upload(name=b"ab\xff\xfe"), "The value of field name is not valid UTF-8."),
        (model_upload(field=b"na\xffme"), "a part name is not valid UTF-8"),
        (model_upload(filename=b"m\xff.pt"), "not valid UTF-8"),
    ],
    ids=["field value", "field name", "file name"],
)
def test_multipart_invalid_utf8_is_400(world, unchanged, body, message):
    unchanged()

    response = client_for(world.actor).post(
        "/api/models/", body, content_type=f"multipart/form-data; boundary={BOUNDARY}"
    )

    assert response.status_code == 400
    assert message in response.json()["detail"]
    unchanged()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Token ab\xff\xfe", "Token string should not contain invalid characters"),
        ("Basic " + base64.b64encode(b"us\xffer:pa\xfess").decode(), "Invalid username"),
        ("Basic !!!not-base64", "not correctly base64 encoded"),
        ("Bearer \xff", "Invalid Bearer header"),
    ],
    ids=["token", "basic", "basic not base64", "unknown scheme"],
)
def test_authorization_header_not_utf8_is_401(world, unchanged, header, message):
    unchanged()

    response = APIClient().get("/api/users/myself/", HTTP_AUTHORIZATION=header)

    assert response.status_code == 401
    assert message in response.json()["detail"]
    unchanged()


@pytest.mark.parametrize(("name", "raw"), [("after", "%FF"), ("wait", "%FF%FE")])
def test_query_string_invalid_utf8_is_400(world, name, raw):
    response = client_for(world.participant).get(f"/api/users/myself/notifications/?{name}={raw}")

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert f"Query parameter '{name}'" in detail
    assert "\ufffd" in detail


def test_path_invalid_utf8_is_404(world, unchanged):
    unchanged()

    response = client_for(world.actor).delete("/api/models/%FF%FE/")

    assert response.status_code == 404
    # Django keeps bytes that are not UTF-8 percent-encoded in request.path.
    assert "'/api/models/%FF%FE/'" in response.json()["detail"]
    unchanged()
