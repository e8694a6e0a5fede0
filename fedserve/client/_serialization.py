"""Conversion between model files and PyTorch objects on the participant's side.

Downloaded bytes are loaded as TorchScript (`torch.jit.load`) or read weights-only
(`torch.load(..., weights_only=True)`); nothing from the network is unpickled into
arbitrary objects.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STATE_DICT = "state_dict"
TORCHSCRIPT = "torchscript"
SAFETENSORS = "safetensors"
UPDATE_FORMATS = (STATE_DICT, TORCHSCRIPT)


def detect_format(data: bytes) -> str:
    """Return TORCHSCRIPT, STATE_DICT or SAFETENSORS for a model file's bytes."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
        # torch.jit.save writes the module's code next to its data; torch.save does not.
        if any("/code/" in name or name.endswith("constants.pkl") for name in names):
            return TORCHSCRIPT
        return STATE_DICT
    if len(data) >= 10:
        (header_size,) = struct.unpack("<Q", data[:8])
        if 0 < header_size <= len(data) - 8 and data[8:9] == b"{":
            return SAFETENSORS
    # Files written with torch.save(..., _use_new_zipfile_serialization=False).
    return STATE_DICT


def load_module(data: bytes) -> torch.nn.Module:
    """Load a TorchScript archive into a runnable module on the CPU."""
    import torch

    module: torch.nn.Module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return module


def load_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    """Read the weights of any model file as a state dict, without unpickling objects."""
    import torch

    file_format = detect_format(data)
    if file_format == TORCHSCRIPT:
        return dict(load_module(data).state_dict())
    if file_format == SAFETENSORS:
        from safetensors.torch import load as load_safetensors

        return dict(load_safetensors(data))
    loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return {str(key): value for key, value in loaded.items()}
    raise ValueError(
        f"The model file contains a {type(loaded).__name__}, not a state dict of tensors; "
        "save weights with torch.save(module.state_dict(), file)."
    )


def load_model(data: bytes, template: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load a downloaded model: a TorchScript archive directly, weights into `template`.

    A weights-only file (for example another participant's update in a FedDC round) has no
    architecture, so it needs a module of the same architecture to load into. `template`
    is changed in place and returned.
    """
    if detect_format(data) == TORCHSCRIPT:
        return load_module(data)
    if template is None:
        raise ValueError(
            "The downloaded file contains weights only; pass a module of the same architecture "
            "(for example the training's global model) to load them into."
        )
    template.load_state_dict(load_state_dict(data), strict=True)
    return template


def save_tensor(tensor: torch.Tensor) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return buffer.getvalue()


def update_bytes(update: Any, file_format: str = STATE_DICT) -> bytes:
    """Serialize a local update: a module or a state dict, as a state dict or TorchScript."""
    import torch

    if file_format not in UPDATE_FORMATS:
        raise ValueError(
            f"Unknown update format {file_format!r}; use 'state_dict' or 'torchscript'."
        )
    buffer = io.BytesIO()
    if file_format == TORCHSCRIPT:
        if not isinstance(update, torch.nn.Module):
            raise ValueError(
                "A TorchScript update needs the trained module, not a state dict; return the "
                "module from train(), or upload the update as a state dict."
            )
        scripted = (
            update if isinstance(update, torch.jit.ScriptModule) else torch.jit.script(update)
        )
        torch.jit.save(scripted, buffer)
        return buffer.getvalue()

    if isinstance(update, torch.nn.Module):
        update = update.state_dict()
    if not isinstance(update, Mapping):
        raise ValueError(
            f"train() must return a module or a state dict, not {type(update).__name__}."
        )
    # A plain dict of detached CPU tensors is what the server reads with weights_only=True.
    plain = {str(key): value.detach().cpu().contiguous() for key, value in update.items()}
    torch.save(plain, buffer)
    return buffer.getvalue()


def module_bytes(module: Any) -> bytes:
    """Serialize a global model: TorchScript bytes as they are, or a module via torch.jit."""
    import torch

    if isinstance(module, bytes | bytearray):
        return bytes(module)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"A global model must be an nn.Module, TorchScript bytes or a file path, "
            f"not {type(module).__name__}."
        )
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()
