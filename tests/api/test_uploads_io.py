"""How the multipart parser reads and writes: gunicorn's socket and the writer thread."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader

from fedserve.api import uploads
from fedserve.api.uploads import StreamingMultiPartParser
from tests.api.test_uploads import CONTENT_TYPE, multipart_body, parse


@pytest.fixture
def temp_dir(settings, tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    return folder


@pytest.fixture
def small_blocks(monkeypatch):
    """Receive in blocks small enough that tests cycle through every pooled buffer."""
    monkeypatch.setattr(uploads, "READ_CHUNK_BYTES", 48 * 1024)


@pytest.mark.parametrize("size", [0, 17, 48 * 1024, 9 * 48 * 1024 + 5])
def test_writer_thread_keeps_file_content(temp_dir, small_blocks, size):
    content = os.urandom(size)
    body = multipart_body([("name", "x")], [("a", "a.pt", content), ("b", "b.pt", content[::-1])])

    parsed = parse(body)

    assert parsed.data["name"] == "x"
    for field, expected in (("a", content), ("b", content[::-1])):
        upload = parsed.files[field]
        assert upload.size == len(expected)
        assert upload.read() == expected
        upload.close()
    assert list(temp_dir.iterdir()) == []


def test_write_error_reaches_request_and_removes_files(temp_dir, small_blocks, monkeypatch):
    def full_disk(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uploads.TemporaryUploadedFile, "write", property(lambda self: full_disk))
    body = multipart_body([], [("a", "a.pt", os.urandom(500 * 1024))])

    with pytest.raises(OSError, match="No space left"):
        parse(body)

    assert list(temp_dir.iterdir()) == []
    assert not any(thread.name == "upload-writer" for thread in threading.enumerate())


# gunicorn's request body, read from its socket


def gunicorn_request(body: bytes, already_received: int, pipelined: bytes = b""):
    """Build gunicorn's body objects for `body` as its gthread worker does.

    gunicorn has received the first `already_received` bytes of the body with the headers,
    and `pipelined` (the next request) too if the whole body fit. The rest waits in the
    socket.
    """
    server, client = socket.socketpair()
    unreader = SocketUnreader(server)
    received = body[:already_received]
    if already_received >= len(body):
        received += pipelined
    unreader.buf.write(received)
    rest = body[already_received:] + (pipelined if already_received < len(body) else b"")

    def send() -> None:
        # The server side may stop reading and close early, as after a 413.
        with contextlib.suppress(OSError):
            client.sendall(rest)

    sender = threading.Thread(target=send)
    sender.start()
    wsgi_input = Body(LengthReader(unreader, len(body)))
    environ = {
        "gunicorn.socket": server,
        "wsgi.input": wsgi_input,
        "CONTENT_LENGTH": str(len(body)),
    }
    return SimpleNamespace(
        environ=environ, unreader=unreader, body=wsgi_input, sender=sender, sockets=(server, client)
    )


@pytest.mark.parametrize("already_received", [0, 100, 10**9])
def test_socket_body_read_whole_leaves_next_request(temp_dir, small_blocks, already_received):
    content = os.urandom(150 * 1024)
    body = multipart_body([("name", "x")], [("a", "a.pt", content)])
    pipelined = b"GET /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    request = gunicorn_request(body, min(already_received, len(body)), pipelined)

    parsed = StreamingMultiPartParser().parse(
        io.BytesIO(b"not read"), CONTENT_TYPE, {"request": SimpleNamespace(META=request.environ)}
    )
    request.sender.join()

    assert parsed.data["name"] == "x"
    assert parsed.files["a"].read() == content
    parsed.files["a"].close()
    assert request.body.reader.length == 0
    # The next request on the connection is still gunicorn's to read.
    request.sockets[1].close()
    assert request.unreader.read(len(pipelined)) == pipelined
    request.sockets[0].close()


def test_socket_body_partly_read_leaves_remaining_length(temp_dir, small_blocks, settings):
    settings.FEDSERVE_MAX_UPLOAD_BYTES = 100 * 1024
    body = multipart_body([], [("a", "a.pt", os.urandom(400 * 1024))])
    request = gunicorn_request(body, 0)

    with pytest.raises(uploads.PayloadTooLarge):
        StreamingMultiPartParser().parse(
            None, CONTENT_TYPE, {"request": SimpleNamespace(META=request.environ)}
        )

    # gunicorn drains or closes the connection from the length it still expects.
    assert 0 < request.body.reader.length < len(body)
    request.sockets[0].close()
    request.sender.join()
    request.sockets[1].close()
    assert list(temp_dir.iterdir()) == []


def test_socket_body_not_taken_once_reading_started():
    body = b"x" * 1000
    request = gunicorn_request(body, len(body))
    request.body.read(10)

    assert uploads._GunicornSocketBody.take_over(request.environ) is None
    assert uploads._GunicornSocketBody.take_over({"wsgi.input": io.BytesIO(body)}) is None
    request.sender.join()
    for sock in request.sockets:
        sock.close()
