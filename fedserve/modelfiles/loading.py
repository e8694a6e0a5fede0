"""Load modules, state dicts and tensors from model files, and check that a module loads.

A pickled module is unpickled only when `settings.FEDSERVE_ALLOW_PICKLED_MODULES` is on.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import torch
from django.conf import settings

from fedserve.core.models import FileFormat
from fedserve.modelfiles.detection import _unsafe_globals, detect_format
from fedserve.modelfiles.formats import (
    _FORMAT_NAMES,
    FileSource,
    ModelFileError,
    _as_file,
    _is_zip,
)
from fedserve.modelfiles.safetensors_files import _load_safetensors

# Largest tensor data of a TorchScript archive that check_module_file loads (64 MiB).
MODULE_CHECK_MAX_TENSOR_BYTES = 64 * 1024 * 1024


def load_module(
    fileobj: FileSource, fmt: str | None = None, *, map_location: str | None = None
) -> torch.nn.Module:
    """Load a runnable module from a TorchScript archive or, where enabled, a pickled module.

    `map_location="meta"` reads only the architecture and tensor shapes, not the weights.
    """
    handle = _as_file(fileobj)
    fmt = fmt or detect_format(handle)
    handle.seek(0)

    if fmt == FileFormat.TORCHSCRIPT:
        # torch.jit.load reads a file object whole into memory, but from a path it reads only
        # the records it needs (on the meta device: no tensor data).
        source: IO[bytes] | str = _file_path(handle) or handle
        try:
            return torch.jit.load(source, map_location=map_location)
        except Exception as error:  # TorchScript raises RuntimeError and others on bad archives
            raise ModelFileError(f"The TorchScript archive cannot be loaded ({error}).") from None
    if fmt == FileFormat.PICKLED_MODULE:
        module = _load_pickled(handle, map_location=map_location)
        if not isinstance(module, torch.nn.Module):
            raise ModelFileError(
                f"The torch.save file contains a {type(module).__name__}, not an nn.Module."
            )
        return module
    raise ModelFileError(
        "The file contains only weights, but a global model needs an architecture: save the "
        "module with torch.jit.save(torch.jit.script(model), path)."
    )


def check_module_file(fileobj: FileSource, fmt: str | None = None) -> FileFormat:
    """Check that a file contains a module this server can load; return its format.

    A TorchScript archive is loaded on the meta device when its tensor data is at most
    `MODULE_CHECK_MAX_TENSOR_BYTES`. torch.jit.load reads every tensor record into memory
    even then, so a larger archive is only checked for its structure (code, constants and
    a data pickle that disassembles), which keeps an upload's memory independent of the
    model size.
    """
    handle = _as_file(fileobj)
    fmt = FileFormat(fmt or detect_format(handle))
    handle.seek(0)
    if fmt != FileFormat.TORCHSCRIPT or _tensor_bytes(handle) <= MODULE_CHECK_MAX_TENSOR_BYTES:
        load_module(handle, fmt, map_location="meta")
        return fmt

    # NOTE: such an archive can still fail to load later (bad TorchScript code), which
    # then surfaces where it is first loaded: metadata, inference or aggregation.
    with zipfile.ZipFile(handle) as archive:
        for name in archive.namelist():
            if name.endswith(("/data.pkl", "/constants.pkl")):
                try:
                    for _opcode in pickletools.genops(archive.read(name)):
                        pass
                except Exception as error:  # pickletools raises ValueError and others
                    raise ModelFileError(
                        f"The TorchScript archive's {name} is damaged ({error})."
                    ) from None
    handle.seek(0)
    return fmt


def _tensor_bytes(handle: IO[bytes]) -> int:
    with zipfile.ZipFile(handle) as archive:
        total = sum(info.file_size for info in archive.infolist() if "/data/" in info.filename)
    handle.seek(0)
    return total


def _load_pickled(handle: IO[bytes], *, map_location: str | None) -> Any:
    if not settings.FEDSERVE_ALLOW_PICKLED_MODULES:
        raise ModelFileError(
            f"{_describe_pickle(handle)} Reading them would run code from the file, so this "
            "server does not unpickle them (FEDSERVE_ALLOW_PICKLED_MODULES is off). Save the "
            "model with torch.jit.save, or send its state_dict()."
        )
    handle.seek(0)
    try:
        # Allowed by the operator through FEDSERVE_ALLOW_PICKLED_MODULES; this runs file code.
        return torch.load(handle, map_location=map_location or "cpu", weights_only=False)
    except Exception as error:
        raise ModelFileError(f"The pickled module cannot be loaded ({error}).") from None


def _describe_pickle(handle: IO[bytes]) -> str:
    names = ", ".join(_unsafe_globals(handle)[:5]) if _is_zip(handle) else "Python objects"
    return f"The torch.save file contains pickled Python objects ({names})."


def _file_path(handle: IO[bytes]) -> str | None:
    """Return the filesystem path of an open file, or None when it has none."""
    temporary_path = getattr(handle, "temporary_file_path", None)
    if callable(temporary_path):
        return str(temporary_path())
    name = getattr(handle, "name", None)
    if not isinstance(name, str) or not os.path.isabs(name):
        return None
    # The name of a wrapped file may be a client's file name; only trust it if it is this file.
    try:
        opened, named = os.fstat(handle.fileno()), os.stat(name)
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        return None
    return name


def load_state_dict(
    fileobj: FileSource, fmt: str | None = None, *, map_location: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a state dict (buffers included) from a file in any accepted format.

    `map_location="meta"` returns tensors with shapes and dtypes but no data, without
    reading the data from the file.
    """
    handle = _as_file(fileobj)
    fmt = fmt or detect_format(handle)
    handle.seek(0)

    if fmt in (FileFormat.TORCHSCRIPT, FileFormat.PICKLED_MODULE):
        module = load_module(handle, fmt, map_location=map_location)
        return dict(module.state_dict())
    if fmt == FileFormat.SAFETENSORS:
        return _load_safetensors(handle, map_location=map_location)
    if fmt == FileFormat.STATE_DICT:
        loaded = _load_weights_only(handle, map_location=map_location)
        return _as_state_dict(loaded)
    raise ModelFileError(f"The file format {fmt!r} is unknown.")


def _load_weights_only(handle: IO[bytes], *, map_location: str | None) -> Any:
    handle.seek(0)
    try:
        return torch.load(handle, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelFileError(
            "The torch.save file contains Python objects other than tensors and plain "
            f"containers, which this server does not unpickle ({_first_line(error)})."
        ) from None
    except Exception as error:
        raise ModelFileError(f"The torch.save file cannot be read ({error}).") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _as_state_dict(loaded: Any) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise ModelFileError(
            f"The torch.save file contains a {type(loaded).__name__}, not a state dict "
            "(a dict from parameter names to tensors)."
        )
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelFileError(
                f"The state dict entry {key!r} is a {type(value).__name__}; a state dict maps "
                "names (str) to tensors only."
            )
        state_dict[key] = value
    return state_dict


def load_tensor(fileobj: FileSource) -> torch.Tensor:
    """Load one tensor from a weights-only torch.save file or a one-tensor safetensors file."""
    handle = _as_file(fileobj)
    fmt = detect_format(handle)
    handle.seek(0)

    if fmt == FileFormat.STATE_DICT:
        loaded = _load_weights_only(handle, map_location="cpu")
        if isinstance(loaded, torch.Tensor):
            return loaded
        raise ModelFileError(
            f"The torch.save file contains a {type(loaded).__name__}, not a single tensor; "
            "save the tensor itself with torch.save(tensor, path)."
        )
    if fmt == FileFormat.SAFETENSORS:
        tensors = _load_safetensors(handle, map_location=None)
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ModelFileError(
            f"The safetensors file contains {len(tensors)} tensors; a single tensor is expected."
        )
    if fmt == FileFormat.PICKLED_MODULE:
        raise ModelFileError(
            f"{_describe_pickle(handle)} Reading them would run code from the file, so this "
            "server does not unpickle them; send a tensor saved with torch.save(tensor, path)."
        )
    raise ModelFileError(
        f"The file is {_FORMAT_NAMES.get(fmt, fmt)}, not a single tensor; send a torch.save "
        "file of one tensor."
    )


def map_state_dict(path: str) -> dict[str, torch.Tensor] | None:
    """Memory-map the state dict of a torch.save zip file at `path`, read weights-only.

    The tensors read the page cache directly instead of copies of it. The mapping is
    private, so writes to the tensors never reach the file. Returns None for a file that
    cannot be mapped (a legacy torch.save file, say) or that is not a dict of tensors.
    The caller then loads it with `load_state_dict`, which raises the usual errors.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError):
        return None
    if isinstance(loaded, dict) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        return loaded
    return None
