"""Read the header and tensors of safetensors files, checking offsets against the file size."""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterator
from typing import IO, Any

import safetensors.torch
import torch

from fedserve.modelfiles.formats import ModelFileError

# Largest safetensors header accepted (100 MB), far above the header of any real model.
_MAX_SAFETENSORS_HEADER = 100_000_000

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}


def _read_safetensors_header(handle: IO[bytes], *, strict: bool) -> dict[str, Any] | None:
    """Return the JSON header of a safetensors file, or None when it is not one (strict=False)."""
    handle.seek(0, io.SEEK_END)
    file_size = handle.tell()
    handle.seek(0)
    (header_size,) = struct.unpack("<Q", handle.read(8))

    header: Any = None
    if 2 <= header_size <= min(_MAX_SAFETENSORS_HEADER, file_size - 8):
        raw = handle.read(header_size)
        if raw.startswith(b"{"):
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
    handle.seek(0)

    if not isinstance(header, dict):
        if strict:
            raise ModelFileError("The safetensors header is not a JSON object.")
        return None
    header["__data_start__"] = 8 + header_size
    header["__file_size__"] = file_size
    return header


def _safetensors_entries(
    handle: IO[bytes],
) -> Iterator[tuple[str, torch.dtype, list[int], int, int]]:
    """Yield (name, dtype, shape, begin, end) of each tensor; offsets are absolute."""
    header = _read_safetensors_header(handle, strict=True)
    assert header is not None
    data_start = header.pop("__data_start__")
    file_size = header.pop("__file_size__")
    header.pop("__metadata__", None)

    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(size) for size in entry["shape"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(
                f"The safetensors entry {name!r} has an unknown dtype or a malformed header "
                f"({entry!r})."
            ) from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0 or data_start + end > file_size:
            raise ModelFileError(
                f"The safetensors entry {name!r} has data offsets {begin}..{end} that do not "
                f"fit its shape {shape} or the file size."
            )
        yield name, dtype, shape, data_start + begin, data_start + end


def _load_safetensors(handle: IO[bytes], *, map_location: str | None) -> dict[str, torch.Tensor]:
    if map_location == "meta":
        return {
            name: torch.empty(shape, dtype=dtype, device="meta")
            for name, dtype, shape, _begin, _end in _safetensors_entries(handle)
        }
    list(_safetensors_entries(handle))  # validates the header with a clear message first
    handle.seek(0)
    try:
        tensors = safetensors.torch.load(handle.read())
    except Exception as error:  # the Rust reader raises its own SafetensorError
        raise ModelFileError(f"The safetensors file cannot be read ({error}).") from None
    if map_location not in (None, "cpu"):
        tensors = {name: tensor.to(map_location) for name, tensor in tensors.items()}
    return tensors
