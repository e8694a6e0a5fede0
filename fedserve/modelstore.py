"""The model store: where model files live (a local folder or an S3-compatible bucket).

Rows in the database keep only the storage paths returned here. Every path is under
`models/<model id>/` or `swag/<statistic id>/`, so deleting a model removes its folder.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import IO

from django.core.files import File
from django.core.files.storage import Storage, storages

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024


def storage() -> Storage:
    """Return the configured model storage backend."""
    return storages["models"]


def model_file_path(model_id: object, name: str) -> str:
    """Return the storage path for a file that belongs to a model."""
    return f"models/{model_id}/{name}"


def save(path: str, content: IO[bytes]) -> str:
    """Store `content` at `path`, replacing any file there, and return the stored path.

    `content` is read in chunks. A Django `TemporaryUploadedFile` on the same filesystem
    as a local store is moved instead of copied.
    """
    store = storage()
    if store.exists(path):
        store.delete(path)
    django_file = content if isinstance(content, File) else File(content)
    stored = store.save(path, django_file)
    if stored != path:
        # Storage renamed the file because of a race with another writer: keep ours.
        logger.warning("model store saved %s as %s", path, stored)
    return stored


def open_file(path: str) -> IO[bytes]:
    """Open a stored file for reading in binary mode."""
    return storage().open(path, "rb")


def iter_chunks(path: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a stored file in chunks, closing it at the end."""
    with open_file(path) as handle:
        while chunk := handle.read(chunk_size):
            yield chunk


def size(path: str) -> int:
    return storage().size(path)


def exists(path: str) -> bool:
    return bool(path) and storage().exists(path)


def copy(source: str, destination: str) -> str:
    """Copy a stored file to a new path, streaming."""
    with open_file(source) as handle:
        return save(destination, handle)


def delete(paths: list[str]) -> None:
    """Delete stored files; a missing file is not an error."""
    store = storage()
    for path in paths:
        if path and store.exists(path):
            store.delete(path)


def copy_to_local(path: str, destination: IO[bytes]) -> None:
    """Copy a stored file into an open local file, for loaders that need a seekable path."""
    with open_file(path) as handle:
        shutil.copyfileobj(handle, destination, CHUNK_SIZE)
