"""The model file formats this server accepts, and the error raised for any other file."""

from __future__ import annotations

import io
from typing import IO

from django.conf import settings

from fedserve.core.models import FileFormat

FileSource = IO[bytes] | bytes


_FORMAT_NAMES = {
    FileFormat.TORCHSCRIPT: "a TorchScript archive",
    FileFormat.STATE_DICT: "a torch.save file of weights",
    FileFormat.SAFETENSORS: "a safetensors file",
    FileFormat.PICKLED_MODULE: "a pickled Python object",
}


class ModelFileError(ValueError):
    """A file that is not a model file fedserve reads; the message lists the accepted formats."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} Accepted formats: {accepted_formats()}.")
        self.problem = problem


def accepted_formats() -> str:
    """Describe the formats this server reads, as used in error messages."""
    formats = [
        "a TorchScript archive from torch.jit.save",
        "a torch.save file of a state dict or a tensor (read weights-only)",
        "a safetensors file",
    ]
    if settings.FEDSERVE_ALLOW_PICKLED_MODULES:
        formats.append("a torch.save file of a whole nn.Module (enabled on this server)")
    return "; ".join(formats)


def _as_file(source: FileSource) -> IO[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source))
    source.seek(0)
    return source


def _is_zip(handle: IO[bytes]) -> bool:
    handle.seek(0)
    head = handle.read(4)
    handle.seek(0)
    return head == b"PK\x03\x04"
