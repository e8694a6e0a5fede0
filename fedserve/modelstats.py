"""Model statistics for the metadata endpoint: parameter counts, sizes and a layer summary.

Modules are loaded on PyTorch's meta device, which keeps shapes and dtypes but no data, so
the statistics of a large model cost neither its memory nor reading its weights. Without an
input shape nothing runs, and a TorchScript archive's statistics come from its layout, which
modelfiles reads without torch.jit.load.
"""

from __future__ import annotations

import logging
from typing import IO, Any

import torch

from fedserve import modelfiles
from fedserve.core.models import FileFormat

logger = logging.getLogger(__name__)


def summarize(
    fileobj: IO[bytes], fmt: str, input_shape: list[int | None] | None, file_size: int
) -> dict[str, Any] | None:
    """Return statistics of a model file, or None when the file cannot be read.

    The layer summary comes from running the module on a zero tensor of `input_shape`, where
    a free dimension counts as 1. It is None without an input shape or when the run fails.
    """
    try:
        if fmt in (FileFormat.TORCHSCRIPT, FileFormat.PICKLED_MODULE) and input_shape is None:
            # Counts and sizes need no module to run, so a TorchScript archive's layout is
            # read without its tensor data.
            layout = modelfiles.read_module_layout(fileobj, fmt)
            return _module_stats(layout.parameters, layout.buffers, fmt, file_size)
        if fmt in (FileFormat.TORCHSCRIPT, FileFormat.PICKLED_MODULE):
            module = modelfiles.load_module(fileobj, fmt, map_location="meta")
            return _summarize_module(module, fmt, input_shape, file_size)
        state_dict = modelfiles.load_state_dict(fileobj, fmt, map_location="meta")
    except modelfiles.ModelFileError as error:
        logger.warning("model file statistics unavailable: %s", error.problem)
        return None
    return {
        "format": fmt,
        "file_size": file_size,
        "total_parameters": sum(tensor.numel() for tensor in state_dict.values()),
        "trainable_parameters": None,
        "parameter_bytes": sum(_nbytes(tensor) for tensor in state_dict.values()),
        "buffer_bytes": None,
        "input_shape": None,
        "output_shape": None,
        "layers": None,
    }


def _module_stats(
    parameters: list[torch.Tensor], buffers: list[torch.Tensor], fmt: str, file_size: int
) -> dict[str, Any]:
    """Return the statistics of a module without a layer summary."""
    return {
        "format": fmt,
        "file_size": file_size,
        "total_parameters": sum(p.numel() for p in parameters),
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "parameter_bytes": sum(_nbytes(p) for p in parameters),
        "buffer_bytes": sum(_nbytes(b) for b in buffers),
        "input_shape": None,
        "output_shape": None,
        "layers": None,
    }


def _summarize_module(
    module: torch.nn.Module, fmt: str, input_shape: list[int | None] | None, file_size: int
) -> dict[str, Any]:
    stats = _module_stats(list(module.parameters()), list(module.buffers()), fmt, file_size)
    if input_shape is None:
        return stats

    concrete_shape = [1 if size is None else int(size) for size in input_shape]
    stats["input_shape"] = concrete_shape
    try:
        output_shape, layers = _run_with_hooks(module, concrete_shape)
    except Exception as error:  # user code: any exception means "no summary", never a 500
        logger.info("layer summary unavailable for input shape %s: %s", concrete_shape, error)
        return stats
    stats["output_shape"] = output_shape
    stats["layers"] = layers
    return stats


def _run_with_hooks(
    module: torch.nn.Module, input_shape: list[int]
) -> tuple[Any, list[dict[str, Any]]]:
    layers: dict[str, dict[str, Any]] = {}
    handles = []
    # TorchScript modules reject forward hooks; their layers are listed without output shapes.
    hooks_supported = not isinstance(module, torch.jit.ScriptModule)

    for name, child in module.named_modules():
        if not name:
            continue
        layers[name] = {
            "name": name,
            "type": _type_name(child),
            "parameters": sum(p.numel() for p in child.parameters(recurse=False)),
            "output_shape": None,
        }
        if hooks_supported:
            handles.append(child.register_forward_hook(_shape_recorder(layers[name])))

    try:
        module.eval()
        with torch.no_grad():
            output = module(torch.zeros(input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return _shape_of(output), list(layers.values())


def _shape_recorder(entry: dict[str, Any]) -> Any:
    def record(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        entry["output_shape"] = _shape_of(output)

    return record


def _shape_of(value: Any) -> Any:
    """Describe a module output: a tensor's shape, or the same for each item of a container."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, list | tuple):
        return [_shape_of(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _shape_of(item) for key, item in value.items()}
    return None


def _type_name(module: torch.nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
