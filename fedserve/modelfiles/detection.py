"""Detect the format of a model file from its content, never from its file name."""

from __future__ import annotations

import pickle
import zipfile
from typing import IO

import torch

from fedserve.core.models import FileFormat
from fedserve.modelfiles.formats import FileSource, ModelFileError, _as_file
from fedserve.modelfiles.safetensors_files import _read_safetensors_header


def detect_format(fileobj: FileSource) -> FileFormat:
    """Tell the format of a model file from its content; raise ModelFileError if unknown."""
    handle = _as_file(fileobj)
    head = handle.read(8)
    handle.seek(0)
    if len(head) < 8:
        raise ModelFileError(f"The file is {len(head)} bytes long, too short for a model file.")

    if head.startswith(b"PK\x03\x04"):
        return _detect_zip_format(handle)
    if head.startswith(b"\x80"):
        return _detect_legacy_torch_save(handle)
    if _read_safetensors_header(handle, strict=False) is not None:
        return FileFormat.SAFETENSORS
    raise ModelFileError(
        "The file is neither a zip archive (TorchScript or torch.save) nor a safetensors file."
    )


def _detect_zip_format(handle: IO[bytes]) -> FileFormat:
    try:
        with zipfile.ZipFile(handle) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ModelFileError(
            f"The file starts like a zip archive but is damaged ({error})."
        ) from None
    finally:
        handle.seek(0)

    # Every record sits in one top-level folder whose name torch.save and torch.jit.save choose.
    records = {name.split("/", 1)[1] for name in names if "/" in name}
    if "constants.pkl" in records and any(record.startswith("code/") for record in records):
        return FileFormat.TORCHSCRIPT
    if "data.pkl" not in records:
        raise ModelFileError(
            "The file is a zip archive but neither a TorchScript archive nor a torch.save file."
        )
    if _unsafe_globals(handle):
        return FileFormat.PICKLED_MODULE
    return FileFormat.STATE_DICT


def _unsafe_globals(handle: IO[bytes]) -> list[str]:
    """List the Python objects a torch.save file refers to beyond weights-only ones.

    The pickle is disassembled, not run.
    """
    disassemble = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if disassemble is None:
        # Older torch releases lack the disassembler; a weights-only load of the pickle on the
        # meta device (no tensor data) decides instead.
        try:
            torch.load(handle, map_location="meta", weights_only=True)
        except pickle.UnpicklingError:
            return ["Python objects"]
        except Exception as error:
            raise ModelFileError(f"The torch.save file cannot be read ({error}).") from None
        finally:
            handle.seek(0)
        return []
    try:
        found = disassemble(handle)
    except Exception as error:  # damaged pickles raise several exception types
        raise ModelFileError(f"The torch.save file cannot be read ({error}).") from None
    finally:
        handle.seek(0)
    return sorted(found)


def _detect_legacy_torch_save(handle: IO[bytes]) -> FileFormat:
    # The legacy format has no disassembler, so a weights-only load decides whether it is data.
    try:
        torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            return FileFormat.PICKLED_MODULE
        raise ModelFileError(f"The file is not a readable torch.save file ({error}).") from None
    except Exception as error:
        raise ModelFileError(f"The file is not a readable torch.save file ({error}).") from None
    finally:
        handle.seek(0)
    return FileFormat.STATE_DICT
