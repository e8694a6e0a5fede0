"""Request parsers for uploads: streaming multipart/form-data and size-limited JSON.

The multipart parser writes each file part straight to a temporary file in
`settings.FILE_UPLOAD_TEMP_DIR` while it reads the body, so memory does not grow with the
file size. A local model store later moves that file into place instead of copying it.
Uploads over `settings.FEDSERVE_MAX_UPLOAD_BYTES` are rejected with 413 before the body is
read when the request declares its length, and otherwise as soon as the limit is passed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
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
    try:
        return int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


class _FormCollector:
    """Callbacks for python-multipart that collect fields in memory and files on disk."""

    def __init__(self, *, max_file_bytes: int, max_field_bytes: int) -> None:
        self.data = QueryDict(mutable=True)
        self.files: MultiValueDict[str, TemporaryUploadedFile] = MultiValueDict()
        self.finished = False
        self._max_file_bytes = max_file_bytes
        self._max_field_bytes = max_field_bytes
        self._file_bytes = 0
        self._field_bytes = 0
        self._open_files: list[TemporaryUploadedFile] = []

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
            self._file.write(memoryview(data)[start:end])
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

        collector = _FormCollector(
            max_file_bytes=max_file_bytes, max_field_bytes=settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        )
        try:
            self._feed(stream, boundary, collector, max_file_bytes + FORM_ALLOWANCE_BYTES)
        except (MultipartParseError, FormParserError) as error:
            collector.discard()
            raise ParseError(f"The multipart body is malformed: {error}") from None
        except BaseException:
            collector.discard()
            raise
        return DataAndFiles(collector.data, collector.files)

    def _feed(
        self, stream: IO[bytes] | None, boundary: bytes, collector: _FormCollector, max_body: int
    ) -> None:
        parser = MultipartParser(boundary, cast(Any, collector.callbacks()))
        body_bytes = 0
        while stream is not None:
            chunk = stream.read(READ_CHUNK_BYTES)
            if not chunk:
                break
            body_bytes += len(chunk)
            if body_bytes > max_body:
                raise PayloadTooLarge(upload_limit_message(settings.FEDSERVE_MAX_UPLOAD_BYTES))
            parser.write(chunk)
        parser.finalize()
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
