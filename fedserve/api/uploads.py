"""Request parsers for uploads: streaming multipart/form-data and size-limited JSON.

The multipart parser writes each file part to a temporary file in
`settings.FILE_UPLOAD_TEMP_DIR` (on a writer thread) while it reads the body into a few
reused buffers, so memory does not grow with the file size. A local model store later
moves that file into place instead of copying it.
Uploads over `settings.FEDSERVE_MAX_UPLOAD_BYTES` are rejected with 413 before the body is
read when the request declares its length, and otherwise as soon as the limit is passed.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import IO, Any, cast

from django.conf import settings
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser, DataAndFiles, JSONParser

from fedserve.api.errors import PayloadTooLarge

logger = logging.getLogger(__name__)

# Bytes read from the request body at a time.
READ_CHUNK_BYTES = 1024 * 1024
# Receive buffers of READ_CHUNK_BYTES per request, and file writes queued for the writer
# thread: together they bound the memory of an upload whose writes lag behind.
RECEIVE_BUFFERS = 4
WRITE_QUEUE_DEPTH = 8
# Room in a request body for form fields and multipart framing, beyond the file limit.
FORM_ALLOWANCE_BYTES = 1024 * 1024

_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


def upload_limit_message(limit: int) -> str:
    return (
        f"The upload is larger than this server's limit of {limit} bytes "
        f"({limit / 1_000_000:.1f} MB) for model files, set by FEDSERVE_MAX_UPLOAD_BYTES. "
        "Send a smaller file, or ask the operator to raise the limit."
    )


def _declared_length(parser_context: Mapping[str, Any] | None) -> int | None:
    request = (parser_context or {}).get("request")
    if request is None:
        return None
    return _content_length(request.META)


def _content_length(environ: Mapping[str, Any]) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


# Reading the request body


def _body_chunks(
    stream: IO[bytes] | None, parser_context: Mapping[str, Any] | None, pool: _BufferPool
) -> Iterator[bytes | bytearray]:
    """Yield the request body in blocks of up to READ_CHUNK_BYTES.

    Under gunicorn the body is read from the client socket (see `_GunicornSocketBody`)
    into buffers taken from `pool`, and the consumer gives them back. Elsewhere it is read
    from `stream` as bytes.
    """
    request = (parser_context or {}).get("request")
    socket_body = _GunicornSocketBody.take_over(getattr(request, "META", None))
    if socket_body is not None:
        yield from socket_body.chunks(pool)
        return
    while stream is not None:
        chunk = stream.read(READ_CHUNK_BYTES)
        if not chunk:
            return
        yield chunk


class _GunicornSocketBody:
    """The unread body of a gunicorn request, received from its socket into pooled buffers.

    gunicorn's `wsgi.input` copies every received block several times through BytesIO
    buffers, which took about a third of the request thread's time in a profile of a
    512 MB upload (benchmarks/transfer.py, 2-core virtual machine). Here
    `recv_into` fills reused buffers directly. The remaining length in gunicorn's
    LengthReader is kept up to date, so after a partly read body (a 413, a malformed part)
    gunicorn drains or closes the connection as it would after reading `wsgi.input`.
    """

    def __init__(self, sock: socket.socket, body: Any, pending: bytes) -> None:
        self._sock = sock
        self._body = body
        self._reader = body.reader
        self._pending = pending

    @classmethod
    def take_over(cls, environ: Mapping[str, Any] | None) -> _GunicornSocketBody | None:
        """Return a reader for a gunicorn request body of known length that is still unread,
        or None (another server, chunked encoding, a body already partly read).

        NOTE: this relies on gunicorn's Body, LengthReader and SocketUnreader (checked
        with gunicorn 27.0); for any other shape it returns None and the caller reads
        `wsgi.input` instead.
        """
        if not environ:
            return None
        try:
            from gunicorn.http.body import Body, LengthReader
            from gunicorn.http.unreader import SocketUnreader
        except ImportError:
            return None
        sock = environ.get("gunicorn.socket")
        body: Any = environ.get("wsgi.input")
        if not isinstance(sock, socket.socket) or type(body) is not Body:
            return None
        reader: Any = getattr(body, "reader", None)
        if type(reader) is not LengthReader or type(reader.unreader) is not SocketUnreader:
            return None
        unread_from_start = reader.length == _content_length(environ) and not body.buf.tell()
        if reader.unreader.sock is not sock or not unread_from_start:
            return None

        # gunicorn may have received the start of the body (and, with pipelining, more)
        # together with the headers; take this request's share and leave the rest.
        unreader = reader.unreader
        buffered = unreader.buf.getvalue()
        pending = buffered[: reader.length]
        unreader.buf = io.BytesIO()
        unreader.buf.write(buffered[len(pending) :])
        reader.length -= len(pending)
        return cls(sock, body, pending)

    def chunks(self, pool: _BufferPool) -> Iterator[bytes | bytearray]:
        """Yield full buffers from `pool`, and the start and the end of the body as bytes."""
        if self._pending:
            yield self._pending
            self._pending = b""
        while self._reader.length > 0:
            buffer = pool.acquire()
            with memoryview(buffer) as view:
                expected = min(len(buffer), self._reader.length)
                filled = 0
                while filled < expected:
                    received = self._receive(view[filled:expected])
                    if received == 0:
                        break
                    filled += received
                # python-multipart takes whole objects, so a short last block is copied out.
                short_block = bytes(view[:filled]) if filled < len(buffer) else None
            if short_block is not None:
                pool.release(buffer)
                if short_block:
                    yield short_block
                if filled < expected:
                    return  # the client closed the connection before the end of the body
            else:
                yield buffer

    def _receive(self, target: memoryview) -> int:
        try:
            received = self._sock.recv_into(target)
        except BaseException:
            # As in gunicorn's own body reader: where the next request starts on this
            # connection is now unknown, so gunicorn closes it.
            self._body.failed = True
            raise
        self._reader.length -= received
        return received


class _BufferPool:
    """A fixed set of receive buffers, so memory stays bounded while writes lag behind."""

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._owned: set[int] = set()
        for _ in range(count):
            buffer = bytearray(size)
            self._owned.add(id(buffer))
            self._free.put(buffer)

    def acquire(self) -> bytearray:
        """Take a free buffer, waiting for the writer to give one back if none is free."""
        return self._free.get()

    def release(self, buffer: bytearray) -> None:
        self._free.put(buffer)

    def owns(self, chunk: object) -> bool:
        return id(chunk) in self._owned


class _BackgroundWriter:
    """Writes file parts on a thread of its own, in order, while the request thread
    receives and parses the next blocks.

    Writing to the page cache took more time than receiving and parsing the bytes in a
    profile of a 512 MB upload (benchmarks/transfer.py, 2-core virtual machine), and
    both release the GIL, so on two or more cores they overlap. An error from a write
    is raised in the request thread at its next call here.
    """

    def __init__(self, depth: int) -> None:
        # Each item is (callable, run even after a failed write).
        self._queue: queue.Queue[tuple[Callable[[], object], bool] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload-writer", daemon=True)
        self._thread.start()

    def write(self, file: IO[bytes], data: memoryview) -> None:
        self._put((partial(file.write, data), False))

    def release_later(self, pool: _BufferPool, buffer: bytearray) -> None:
        """Give `buffer` back to `pool` once every write queued before has finished."""
        self._put((partial(pool.release, buffer), True))

    def wait(self) -> None:
        """Wait until every queued write has finished; raise the first error of one."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Finish queued work and stop the thread, without raising a write error."""
        self._queue.put(None)
        self._thread.join()

    def _put(self, item: tuple[Callable[[], object], bool]) -> None:
        self._raise_error()
        self._queue.put(item)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, always = item
            try:
                if always or self._error is None:
                    work()
            except BaseException as error:  # raised again in the request thread
                self._error = error
            finally:
                self._queue.task_done()
        self._queue.task_done()


# Parsing multipart bodies


class _FormCollector:
    """Callbacks for python-multipart that collect fields in memory and files on disk."""

    def __init__(
        self,
        *,
        max_file_bytes: int,
        max_field_bytes: int,
        writer: _BackgroundWriter,
    ) -> None:
        self.data = QueryDict(mutable=True)
        self.files: MultiValueDict[str, TemporaryUploadedFile] = MultiValueDict()
        self.finished = False
        self._max_file_bytes = max_file_bytes
        self._max_field_bytes = max_field_bytes
        self._file_bytes = 0
        self._field_bytes = 0
        self._open_files: list[TemporaryUploadedFile] = []
        self._writer = writer

        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._file: TemporaryUploadedFile | None = None
        self._field_value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def discard(self) -> None:
        """Close and thereby delete every temporary file written so far."""
        for upload in self._open_files:
            upload.close()
        self._open_files.clear()

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._file = None
        self._field_value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").strip().lower()] = bytes(
            self._header_value
        ).strip()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise ParseError(
                "Every multipart part needs a 'Content-Disposition: form-data; name=...' header."
            )
        self._name = _decode(options[b"name"], "a part name")
        if b"filename" not in options:
            return

        # A browser sends an empty file name for a file input left empty; there is no file.
        file_name = os.path.basename(_decode(options[b"filename"], "a file name").strip())
        # The name only labels the temporary file, so anything unusual in it is replaced.
        file_name = _UNSAFE_NAME_CHARACTERS.sub("_", file_name)[-100:]
        if not file_name:
            self._name = None
            return
        if len(self._open_files) >= settings.DATA_UPLOAD_MAX_NUMBER_FILES:
            raise ParseError(
                f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FILES} files."
            )
        content_type, _ = parse_options_header(
            self._headers.get("content-type", b"application/octet-stream")
        )
        self._file = TemporaryUploadedFile(file_name, content_type.decode("latin-1"), 0, None, {})
        self._open_files.append(self._file)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name is None:
            return
        size = end - start
        if self._file is not None:
            self._file_bytes += size
            if self._file_bytes > self._max_file_bytes:
                raise PayloadTooLarge(upload_limit_message(self._max_file_bytes))
            # A memoryview slice writes the part without copying it first.
            self._writer.write(self._file, memoryview(data)[start:end])
            return
        self._field_bytes += size
        if self._field_bytes > self._max_field_bytes:
            raise PayloadTooLarge(
                f"The form fields are larger than {self._max_field_bytes} bytes; send large "
                "content as a file part."
            )
        self._field_value += data[start:end]

    def _on_part_end(self) -> None:
        if self._name is None:
            return
        if self._file is not None:
            self._writer.wait()
            self._file.flush()
            self._file.size = self._file.tell()
            self._file.seek(0)
            self.files.appendlist(self._name, self._file)
        else:
            if len(self.data) >= settings.DATA_UPLOAD_MAX_NUMBER_FIELDS:
                raise ParseError(
                    f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} fields."
                )
            self.data.appendlist(
                self._name, _decode(bytes(self._field_value), "field " + self._name)
            )
        self._name = None
        self._file = None

    def _on_end(self) -> None:
        self.finished = True


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(f"The value of {what} is not valid UTF-8.") from None


class StreamingMultiPartParser(BaseParser):
    """Parse multipart/form-data with file parts spooled to temporary files.

    Returns form fields as a QueryDict and files as Django `TemporaryUploadedFile`s; the
    request closes (and so deletes) them when it finishes.
    """

    media_type = "multipart/form-data"

    def parse(
        self,
        stream: IO[bytes] | None,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> DataAndFiles[QueryDict, MultiValueDict[str, TemporaryUploadedFile]]:
        max_file_bytes = settings.FEDSERVE_MAX_UPLOAD_BYTES
        declared = _declared_length(parser_context)
        if declared is not None and declared > max_file_bytes + FORM_ALLOWANCE_BYTES:
            raise PayloadTooLarge(upload_limit_message(max_file_bytes))

        _, options = parse_options_header(media_type or "")
        boundary = options.get(b"boundary")
        if not boundary:
            raise ParseError(
                "The multipart/form-data Content-Type has no boundary parameter; let your HTTP "
                "client build the multipart body."
            )

        pool = _BufferPool(RECEIVE_BUFFERS, READ_CHUNK_BYTES)
        writer = _BackgroundWriter(WRITE_QUEUE_DEPTH)
        collector = _FormCollector(
            max_file_bytes=max_file_bytes,
            max_field_bytes=settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
            writer=writer,
        )
        try:
            try:
                chunks = _body_chunks(stream, parser_context, pool)
                self._feed(chunks, boundary, collector, writer, pool, max_file_bytes)
            finally:
                # Stopped before any temporary file is closed, so no write runs on one.
                writer.close()
        except (MultipartParseError, FormParserError) as error:
            collector.discard()
            raise ParseError(f"The multipart body is malformed: {error}") from None
        except BaseException:
            collector.discard()
            raise
        return DataAndFiles(collector.data, collector.files)

    def _feed(
        self,
        chunks: Iterator[bytes | bytearray],
        boundary: bytes,
        collector: _FormCollector,
        writer: _BackgroundWriter,
        pool: _BufferPool,
        max_file_bytes: int,
    ) -> None:
        parser = MultipartParser(boundary, cast(Any, collector.callbacks()))
        max_body = max_file_bytes + FORM_ALLOWANCE_BYTES
        body_bytes = 0
        for chunk in chunks:
            body_bytes += len(chunk)
            if body_bytes > max_body:
                raise PayloadTooLarge(upload_limit_message(max_file_bytes))
            # python-multipart only searches and indexes the data, which a bytearray supports.
            parser.write(cast(bytes, chunk))
            if isinstance(chunk, bytearray) and pool.owns(chunk):
                writer.release_later(pool, chunk)
        parser.finalize()
        writer.wait()
        if not collector.finished:
            raise ParseError(
                "The multipart body ended before its closing boundary; the upload is incomplete."
            )


class LimitedJSONParser(JSONParser):
    """DRF's JSON parser, rejecting bodies over DATA_UPLOAD_MAX_MEMORY_SIZE with 413.

    A JSON body is read into memory whole, so its size is bounded before reading.
    """

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        declared = _declared_length(parser_context)
        if declared is not None and declared > limit:
            raise PayloadTooLarge(
                f"The JSON body is {declared} bytes, over the limit of {limit} bytes "
                f"({limit / 1_000_000:.1f} MB); upload files as multipart/form-data."
            )
        return super().parse(stream, media_type, parser_context)


def remove_stale_spool_files(directory: str, max_age_seconds: float) -> int:
    """Delete files in the upload spool folder unchanged for `max_age_seconds`; return the count.

    A server killed during an upload leaves its half-written spool file behind. An upload in
    progress writes to its file continuously, so the modification time distinguishes a
    leftover from a file that another server sharing the folder is still receiving.
    """
    removed = 0
    cutoff = time.time() - max_age_seconds
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    if removed:
        logger.info("removed %d stale upload spool files from %s", removed, directory)
    return removed
