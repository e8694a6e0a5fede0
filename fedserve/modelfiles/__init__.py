"""Read and write model files: the only package that turns bytes into PyTorch objects and back.

Formats are detected by content, never by file name:

- TorchScript archive (`torch.jit.save`): a zip with `code/` and `constants.pkl`, read with
  `torch.jit.load`.
- `torch.save` file of a state dict or a single tensor: a zip with `data.pkl` (or the legacy
  pre-1.6 pickle format), read with `torch.load(weights_only=True)`, whose unpickler builds
  only tensors and plain containers.
- safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor data.
- a pickled `nn.Module` (`torch.save` of a whole module): unpickling it runs code chosen by
  the file's author, so it is read only when `settings.FEDSERVE_ALLOW_PICKLED_MODULES` is on.

Functions take a binary, seekable file object (or bytes) and leave its position undefined.

The submodules, whose public functions and classes this package re-exports:

- `formats`: the accepted formats and `ModelFileError`.
- `detection`: `detect_format`.
- `loading`: modules, state dicts and tensors from files, a memory-mapped state dict
  (`map_state_dict`), and `check_module_file`.
- `saving`: state dicts, tensors and modules to files.
- `safetensors_files`: the safetensors header and tensor reader.
- `layout`: keys, shapes and dtypes without tensor data, including the TorchScript reader.
- `checks`: an update compared with the global model, and the float parameter count.
- `values`: the scan for NaN and infinity.

Each submodule imports the functions it calls, so a test that replaces one of them, or a
limit such as `loading.MODULE_CHECK_MAX_TENSOR_BYTES`, patches it in the submodule that
uses it. A patch on this package reaches only callers outside the package.
"""

from fedserve.modelfiles.checks import count_float_parameters, describe_mismatch
from fedserve.modelfiles.detection import detect_format
from fedserve.modelfiles.formats import FileSource, ModelFileError, accepted_formats
from fedserve.modelfiles.layout import ModuleLayout, read_module_layout, read_state_dict_layout
from fedserve.modelfiles.loading import (
    check_module_file,
    load_module,
    load_state_dict,
    load_tensor,
    map_state_dict,
)
from fedserve.modelfiles.saving import (
    save_module,
    save_state_dict,
    save_tensor,
    write_module_with_weights,
)
from fedserve.modelfiles.values import find_non_finite

__all__ = [
    "FileSource",
    "ModelFileError",
    "ModuleLayout",
    "accepted_formats",
    "check_module_file",
    "count_float_parameters",
    "describe_mismatch",
    "detect_format",
    "find_non_finite",
    "load_module",
    "load_state_dict",
    "load_tensor",
    "map_state_dict",
    "read_module_layout",
    "read_state_dict_layout",
    "save_module",
    "save_state_dict",
    "save_tensor",
    "write_module_with_weights",
]
