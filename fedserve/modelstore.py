"""The model store: where model files live (a local folder or an S3-compatible bucket).

Rows in the database keep only the storage paths returned here. Every path is under
`models/<model id>/` or `swag/<statistic id>/`, so deleting a model removes its folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from typing import IO, Any

from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.db import transaction
from storages.backends.s3 import S3Storage
from storages.utils import clean_name

from fedserve.core.models import Model, SwagStatistic

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024


def storage() -> Storage:
    """Return the configured model storage backend."""
    return storages["models"]


def model_file_path(model_id: object, name: str) -> str:
    """Return the storage path for a file that belongs to a model."""
    return f"models/{model_id}/{name}"


def swag_file_path(statistic_id: object, name: str) -> str:
    """Return the storage path for a file of a SWAG statistic."""
    return f"swag/{statistic_id}/{name}"


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


class SpooledFile(File):  # type: ignore[type-arg]
    """A named temporary file to store, which `save` moves into a local store instead of copying."""

    def __init__(self, spool: Any) -> None:
        super().__init__(spool, name=spool.name)
        self._spool = spool

    def temporary_file_path(self) -> str:
        return str(self._spool.name)

    def close(self) -> None:
        # FileNotFoundError: a local store moved the file into place.
        with contextlib.suppress(FileNotFoundError):
            self._spool.close()


def open_file(path: str) -> IO[bytes]:
    """Open a stored file for reading in binary mode."""
    return storage().open(path, "rb")


def is_local() -> bool:
    """Tell whether the model store is a local folder (whose files have real paths)."""
    return isinstance(storage(), FileSystemStorage)


def local_path(path: str) -> str | None:
    """Return the filesystem path of a stored file in a local store, or None for other stores."""
    store = storage()
    if isinstance(store, FileSystemStorage):
        return str(store.path(path))
    return None


def iter_chunks(path: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a stored file in chunks, closing it at the end.

    From an S3 store the object is streamed as it downloads; django-storages' own file
    object would first download all of it.
    """
    store = storage()
    if isinstance(store, S3Storage):
        # _normalize_name applies the store's location prefix, as django-storages' open() does.
        s3_object = store.bucket.Object(store._normalize_name(clean_name(path)))
        body = s3_object.get()["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()
        return
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
    """Delete stored files and then their folders once empty; a missing file is not an error."""
    store = storage()
    for path in paths:
        if path and store.exists(path):
            store.delete(path)
    if isinstance(store, FileSystemStorage):
        _remove_empty_folders(store, paths)


def _remove_empty_folders(store: FileSystemStorage, paths: list[str]) -> None:
    # A local store keeps one folder per model or statistic; object stores have no folders.
    for folder in sorted({os.path.dirname(path) for path in paths if "/" in path}, reverse=True):
        # OSError: the folder still contains another file of the model, or is already gone.
        with contextlib.suppress(OSError):
            os.rmdir(store.path(folder))


def model_file_paths(model: Model) -> list[str]:
    """List every stored file of a model: its own, its local models' and its SWAG statistics'."""
    paths = list(model.storage_paths())
    for local_model in Model.objects.filter(base_model=model):
        paths.extend(local_model.storage_paths())
    for statistic in SwagStatistic.objects.filter(model=model):
        paths.extend(statistic.storage_paths())
    return paths


def delete_model_files(model: Model) -> None:
    """Delete every stored file of a model once the current transaction commits.

    Call it before deleting the row, because the paths of local models and SWAG statistics
    are read from the database now. Outside a transaction the files go at once; when the
    transaction rolls back they stay.
    """
    paths = model_file_paths(model)
    logger.info("deleting %d stored files of model %s", len(paths), model.pk)
    # robust: a storage failure after the commit is logged, not raised into the request.
    transaction.on_commit(lambda: delete(paths), robust=True)


def copy_to_local(path: str, destination: IO[bytes]) -> None:
    """Copy a stored file into an open local file, for loaders that need a seekable path."""
    with open_file(path) as handle:
        shutil.copyfileobj(handle, destination, CHUNK_SIZE)
