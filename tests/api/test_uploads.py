"""The streaming multipart parser: fields, files on disk, size limits, malformed bodies."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from rest_framework.exceptions import ParseError

from fedserve.api.errors import PayloadTooLarge
from fedserve.api.uploads import StreamingMultiPartParser
from fedserve.core.models import Model
from tests.factories import client_for, make_user, torchscript_bytes

BOUNDARY = "fedserve-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_body(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> bytes:
    parts = []
    for name, value in fields:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, content in files:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + content
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def parse(body: bytes, content_type: str = CONTENT_TYPE, declared: int | None = None):
    request = SimpleNamespace(META={"CONTENT_LENGTH": str(declared if declared else len(body))})
    return StreamingMultiPartParser().parse(io.BytesIO(body), content_type, {"request": request})


@pytest.fixture
def temp_dir(settings, tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    return folder


def test_parse_fields_and_files(temp_dir):
    content = os.urandom(3 * 1024 * 1024 + 17)
    body = multipart_body(
        [("name", "tiny"), ("input_shape", "None"), ("input_shape", "4"), ("note", "grüße")],
        [("model_file", "../../etc/model file.pt", content)],
    )

    parsed = parse(body)

    assert parsed.data["name"] == "tiny"
    assert parsed.data.getlist("input_shape") == ["None", "4"]
    assert parsed.data["note"] == "grüße"
    upload = parsed.files["model_file"]
    assert upload.size == len(content)
    assert upload.read() == content
    assert Path(upload.temporary_file_path()).parent == temp_dir
    assert upload.name == "model_file.pt"
    upload.close()
    assert list(temp_dir.iterdir()) == []


def test_parse_ignores_file_part_without_name(temp_dir):
    body = multipart_body([("name", "x")], [("model_file", "", b"ignored")])

    parsed = parse(body)

    assert "model_file" not in parsed.files
    assert list(temp_dir.iterdir()) == []


def test_parse_rejects_declared_length_over_limit(settings, temp_dir):
    settings.FEDSERVE_MAX_UPLOAD_BYTES = 2048
    body = multipart_body([], [("model_file", "m.pt", b"x" * 100)])

    with pytest.raises(PayloadTooLarge) as raised:
        parse(body, declared=50 * 1024 * 1024)

    message = str(raised.value.detail)
    assert "2048 bytes" in message
    assert "(0.0 MB)" in message
    assert "FEDSERVE_MAX_UPLOAD_BYTES" in message
    assert list(temp_dir.iterdir()) == []


def test_parse_rejects_file_over_limit_while_streaming(settings, temp_dir):
    settings.FEDSERVE_MAX_UPLOAD_BYTES = 4096
    body = multipart_body([("name", "x")], [("model_file", "m.pt", b"x" * 100_000)])

    with pytest.raises(PayloadTooLarge, match="4096 bytes"):
        parse(body)

    assert list(temp_dir.iterdir()) == []


def test_parse_rejects_large_form_fields(settings, temp_dir):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = multipart_body([("description", "d" * 5000)], [])

    with pytest.raises(PayloadTooLarge, match="form fields"):
        parse(body)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"--x--\r\n", "multipart/form-data", "no boundary"),
        (
            multipart_body([], [("model_file", "m.pt", b"abc" * 1000)])[:-40],
            CONTENT_TYPE,
            "ended before its closing boundary",
        ),
        (b"this is not multipart at all", CONTENT_TYPE, "malformed"),
        (
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
            CONTENT_TYPE,
            "Content-Disposition",
        ),
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a"\r\n\r\n'.encode()
            + b"\xff\xfe\r\n"
            + f"--{BOUNDARY}--\r\n".encode(),
            CONTENT_TYPE,
            "not valid UTF-8",
        ),
    ],
)
def test_parse_rejects_malformed_bodies(temp_dir, body, content_type, message):
    with pytest.raises(ParseError, match=message):
        parse(body, content_type)

    assert list(temp_dir.iterdir()) == []


@pytest.mark.django_db
def test_endpoint_answers_413_and_stores_nothing(settings, model_store, temp_dir):
    settings.FEDSERVE_MAX_UPLOAD_BYTES = 4096
    body = multipart_body(
        [("name", "big"), ("description", "")],
        [("model_file", "m.pt", torchscript_bytes() + b"\0" * 10_000)],
    )

    response = client_for(make_user()).generic("POST", "/api/models/", body, CONTENT_TYPE)

    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]
    assert not Model.objects.exists()
    assert list(temp_dir.iterdir()) == []
    assert list(model_store.iterdir()) == []


@pytest.mark.django_db
def test_endpoint_answers_400_for_malformed_multipart(model_store, temp_dir):
    body = multipart_body([("name", "x")], [("model_file", "m.pt", b"abc" * 1000)])[:-30]

    response = client_for(make_user()).generic("POST", "/api/models/", body, CONTENT_TYPE)

    assert response.status_code == 400
    assert "closing boundary" in response.json()["detail"]
    assert list(temp_dir.iterdir()) == []


@pytest.mark.django_db
def test_endpoint_removes_temp_files_after_request(model_store, temp_dir):
    body = multipart_body(
        [("name", "x"), ("description", "")], [("model_file", "m.pt", b"not a model")]
    )

    response = client_for(make_user()).generic("POST", "/api/models/", body, CONTENT_TYPE)

    assert response.status_code == 400
    assert list(temp_dir.iterdir()) == []
