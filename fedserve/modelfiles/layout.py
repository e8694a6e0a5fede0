"""Read the keys, shapes and dtypes of a model's state dict or module, without tensor data.

A TorchScript archive is read without torch.jit.load where possible. A restricted unpickler
reads data.pkl and `ast` parses the class declarations in code/, so no code from the file
runs. An archive that this reader cannot read is loaded on the meta device instead.
"""

from __future__ import annotations

import ast
import collections
import logging
import pickle
import zipfile
from typing import IO, Any, NamedTuple, TypeGuard

import torch

from fedserve.core.models import FileFormat
from fedserve.modelfiles.detection import detect_format
from fedserve.modelfiles.formats import FileSource, _as_file
from fedserve.modelfiles.loading import load_module, load_state_dict

logger = logging.getLogger(__name__)


# The legacy storage class names that TorchScript's pickler writes into data.pkl, by dtype.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def read_state_dict_layout(fileobj: FileSource, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """Read the keys, shapes and dtypes of a model file's state dict, as meta tensors.

    No tensor data is read. A TorchScript archive is read by `_read_torchscript_layout`.
    An archive that it cannot read is loaded with torch.jit.load on the meta device instead,
    which reads every tensor record into memory, and an INFO log line gives the reason.
    """
    handle = _as_file(fileobj)
    fmt = fmt or detect_format(handle)
    handle.seek(0)

    if fmt == FileFormat.TORCHSCRIPT:
        layout = _torchscript_layout_or_none(handle)
        if layout is not None:
            return {key: _meta_tensor(tensor) for key, tensor in layout.tensors.items()}
        handle.seek(0)
    return load_state_dict(handle, fmt, map_location="meta")


class ModuleLayout(NamedTuple):
    """A module's parameters and buffers as meta tensors, with requires_grad set.

    The lists have the order of module.parameters() and module.buffers(), and like them
    list a tensor that is shared by several attributes once.
    """

    parameters: list[torch.Tensor]
    buffers: list[torch.Tensor]


def read_module_layout(fileobj: FileSource, fmt: str | None = None) -> ModuleLayout:
    """Read the shapes and dtypes of a module's parameters and buffers, as meta tensors.

    A TorchScript archive is read as by `read_state_dict_layout`, without its tensor data
    unless the layout reader cannot read it. A pickled module is loaded on the meta device.
    """
    handle = _as_file(fileobj)
    fmt = fmt or detect_format(handle)
    handle.seek(0)

    if fmt == FileFormat.TORCHSCRIPT:
        layout = _torchscript_layout_or_none(handle)
        if layout is not None:
            return _module_layout(layout)
        handle.seek(0)
    module = load_module(handle, fmt, map_location="meta")
    return ModuleLayout(list(module.parameters()), list(module.buffers()))


def _torchscript_layout_or_none(handle: IO[bytes]) -> _ArchiveLayout | None:
    """Read an archive's layout; log the reason and return None when the reader cannot."""
    try:
        return _read_torchscript_layout(handle)
    except _LayoutUnavailable as reason:
        logger.info(
            "reading the TorchScript archive's layout with torch.jit.load, which reads "
            "all of its tensor data: %s",
            reason,
        )
        return None


def _module_layout(layout: _ArchiveLayout) -> ModuleLayout:
    # data.pkl stores a shared tensor once, so one object stands for all keys that share it.
    parameters: dict[int, torch.Tensor] = {}
    buffers: dict[int, torch.Tensor] = {}
    for key, tensor in layout.tensors.items():
        found = parameters if key in layout.parameter_keys else buffers
        if id(tensor) not in found:
            found[id(tensor)] = _meta_tensor(tensor, with_grad=True)
    return ModuleLayout(list(parameters.values()), list(buffers.values()))


def _meta_tensor(layout: _TensorLayout, *, with_grad: bool = False) -> torch.Tensor:
    """Build an empty meta tensor of the layout's shape and dtype.

    `with_grad` keeps the archive's requires_grad flag, which only floating-point and
    complex tensors can have. state_dict() returns tensors without it.
    """
    dtype = layout.dtype
    requires_grad = (
        with_grad and layout.requires_grad and (dtype.is_floating_point or dtype.is_complex)
    )
    return torch.empty(layout.shape, dtype=dtype, device="meta", requires_grad=requires_grad)


class _LayoutUnavailable(Exception):
    """The archive uses a feature that the layout reader does not read; the message names it."""


class _StorageType(NamedTuple):
    dtype: torch.dtype


class _StorageLayout(NamedTuple):
    """A storage of a TorchScript archive, whose bytes are the record `<folder>/data/<key>`."""

    dtype: torch.dtype
    numel: int
    key: str


class _TensorLayout(NamedTuple):
    """A tensor of a TorchScript archive: a view of `storage`; offset and stride count elements."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    storage: _StorageLayout
    offset: int
    stride: tuple[int, ...]
    requires_grad: bool


class _ArchiveLayout(NamedTuple):
    """The state dict of a TorchScript archive as data.pkl records it, without tensor data.

    `tensors` has the keys of torch.jit.load(...).state_dict() in order. A tensor shared
    by several keys is one object, as torch.jit.load returns one tensor for it.
    """

    folder: str
    tensors: dict[str, _TensorLayout]
    parameter_keys: frozenset[str]


class _ScriptObject:
    """An instance of a TorchScript class as data.pkl records it: class name and state."""

    qualified_name = ""

    def __init__(self) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _ClassDeclaration(NamedTuple):
    is_module: bool
    parameters: frozenset[str]
    buffers: frozenset[str]
    sets_own_state: bool


def _rebuild_tensor_layout(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    *_rest: object,
) -> _TensorLayout:
    # The arguments of torch._utils._rebuild_tensor_v2; backward hooks and metadata do not count.
    if not isinstance(storage, _StorageLayout):
        raise _LayoutUnavailable(f"a tensor refers to {type(storage).__name__}, not a storage")
    if not _is_index_tuple(size):
        raise _LayoutUnavailable(f"a tensor has the invalid size {size!r:.80}")
    if not _is_index_tuple(stride) or len(stride) != len(size):
        raise _LayoutUnavailable(f"a tensor of size {size!r:.80} has the stride {stride!r:.80}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _LayoutUnavailable(f"a tensor has the invalid storage offset {storage_offset!r:.80}")
    if not isinstance(requires_grad, bool):
        raise _LayoutUnavailable(f"a tensor has requires_grad={requires_grad!r:.80}")
    return _TensorLayout(storage.dtype, size, storage, storage_offset, stride, requires_grad)


def _is_index_tuple(value: object) -> TypeGuard[tuple[int, ...]]:
    return isinstance(value, tuple) and all(type(item) is int and item >= 0 for item in value)


def _untouched(value: object, *_type_tag: object) -> object:
    # torch.jit._pickle's list builders and type tags return their first argument unchanged.
    return value


# The only callables that data.pkl may name, each replaced by one that builds plain data.
_LAYOUT_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_layout,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _untouched,
    ("torch.jit._pickle", "build_doublelist"): _untouched,
    ("torch.jit._pickle", "build_boollist"): _untouched,
    ("torch.jit._pickle", "build_tensorlist"): _untouched,
    ("torch.jit._pickle", "restore_type_tag"): _untouched,
}


class _LayoutUnpickler(pickle.Unpickler):
    """Unpickle a TorchScript data.pkl into plain data, stand-ins and tensor layouts.

    Only the callables in `_LAYOUT_GLOBALS` resolve, each to a function of this module.
    A TorchScript class becomes a `_ScriptObject` subclass that only stores its state, and
    a storage becomes its dtype and size, so no tensor data is read and no code runs.
    """

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self._stand_ins: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified_name = f"{module}.{name}"
            if qualified_name not in self._stand_ins:
                attributes = {"qualified_name": qualified_name}
                self._stand_ins[qualified_name] = type(name, (_ScriptObject,), attributes)
            return self._stand_ins[qualified_name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _LAYOUT_GLOBALS:
            return _LAYOUT_GLOBALS[module, name]
        raise _LayoutUnavailable(f"data.pkl refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageLayout:
        # TorchScript writes ("storage", storage type, record key, device, element count).
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            return _StorageLayout(pid[1].dtype, pid[4], pid[2])
        raise _LayoutUnavailable(f"data.pkl has the unknown persistent id {pid!r:.80}")


def _read_torchscript_layout(handle: IO[bytes]) -> _ArchiveLayout:
    """Read a TorchScript archive's state dict layout from its data.pkl and code.

    data.pkl contains each module's attributes, and the class declarations in code/ tell
    parameters (`__parameters__`) and buffers (`__buffers__`) from other attributes. The
    code is parsed, never run. The keys come in the order of torch.jit.load(...).state_dict():
    per module its parameters, then its buffers, then its submodules, in attribute order.
    Raises _LayoutUnavailable for what this reader does not read. That is a pickle with
    other callables (quantized or sparse tensors, for example), a class that restores its
    own state with `__setstate__`, or an attribute object whose class has no code, such as
    a C++ class.
    """
    try:
        with zipfile.ZipFile(handle) as archive:
            data_pickles = [
                name
                for name in archive.namelist()
                if name.count("/") == 1 and name.endswith("/data.pkl")
            ]
            if len(data_pickles) != 1:
                raise _LayoutUnavailable(f"the archive has {len(data_pickles)} data.pkl records")
            folder = data_pickles[0].split("/", 1)[0]
            with archive.open(data_pickles[0]) as data:
                root = _LayoutUnpickler(data).load()

            declarations = _ClassDeclarations(archive, folder)
            layout = _ArchiveLayout(folder, {}, frozenset())
            if not (
                isinstance(root, _ScriptObject) and declarations.find(root.qualified_name).is_module
            ):
                raise _LayoutUnavailable("data.pkl does not contain a module")
            parameter_keys: set[str] = set()
            _add_module_layout(root, "", declarations, layout.tensors, parameter_keys, set())
            return layout._replace(parameter_keys=frozenset(parameter_keys))
    except _LayoutUnavailable:
        raise
    except Exception as error:  # damaged archives and pickles raise many exception types
        raise _LayoutUnavailable(f"the archive cannot be read ({error!r:.200})") from None


def _add_module_layout(
    module: _ScriptObject,
    prefix: str,
    declarations: _ClassDeclarations,
    layout: dict[str, _TensorLayout],
    parameter_keys: set[str],
    ancestors: set[int],
) -> None:
    declaration = declarations.find(module.qualified_name)
    state = module.state
    if declaration.sets_own_state or not isinstance(state, dict):
        raise _LayoutUnavailable(f"{module.qualified_name} restores its own state")
    missing = (declaration.parameters | declaration.buffers) - state.keys()
    if missing:
        raise _LayoutUnavailable(f"{module.qualified_name} lacks the attributes {sorted(missing)}")

    # As in nn.Module.state_dict: parameters, then buffers, then submodules; a None is left out.
    for names, are_parameters in ((declaration.parameters, True), (declaration.buffers, False)):
        for name, value in state.items():
            if name not in names or value is None:
                continue
            if not isinstance(value, _TensorLayout):
                raise _LayoutUnavailable(f"{prefix}{name} is a {type(value).__name__}")
            layout[prefix + name] = value
            if are_parameters:
                parameter_keys.add(prefix + name)

    ancestors = ancestors | {id(module)}
    for name, value in state.items():
        if not isinstance(value, _ScriptObject):
            continue
        if id(value) in ancestors:
            raise _LayoutUnavailable(f"{prefix}{name} contains itself")
        if declarations.find(value.qualified_name).is_module:
            _add_module_layout(
                value, f"{prefix}{name}.", declarations, layout, parameter_keys, ancestors
            )


class _ClassDeclarations:
    """The classes that a TorchScript archive's code/ records declare, parsed on first use.

    The class `__torch__.a.b.C` is declared in the record `code/__torch__/a/b.py`.
    """

    def __init__(self, archive: zipfile.ZipFile, folder: str) -> None:
        self._archive = archive
        self._folder = folder
        self._by_file: dict[str, dict[str, _ClassDeclaration]] = {}

    def find(self, qualified_name: str) -> _ClassDeclaration:
        module, _, name = qualified_name.rpartition(".")
        if module not in self._by_file:
            self._by_file[module] = self._parse(module)
        declaration = self._by_file[module].get(name)
        if declaration is None:
            raise _LayoutUnavailable(f"the archive's code does not declare {qualified_name}")
        return declaration

    def _parse(self, module: str) -> dict[str, _ClassDeclaration]:
        record = f"{self._folder}/code/{module.replace('.', '/')}.py"
        try:
            source = self._archive.read(record)
        except KeyError:
            return {}
        return {
            node.name: _class_declaration(node)
            for node in ast.parse(source, filename=record).body
            if isinstance(node, ast.ClassDef)
        }


def _class_declaration(node: ast.ClassDef) -> _ClassDeclaration:
    lists: dict[str, frozenset[str]] = {"__parameters__": frozenset(), "__buffers__": frozenset()}
    for statement in node.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id in lists
        ):
            names = ast.literal_eval(statement.value)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _LayoutUnavailable(
                    f"{node.name}.{statement.targets[0].id} is not a list of attribute names"
                )
            lists[statement.targets[0].id] = frozenset(names)
    return _ClassDeclaration(
        is_module=any(isinstance(base, ast.Name) and base.id == "Module" for base in node.bases),
        parameters=lists["__parameters__"],
        buffers=lists["__buffers__"],
        sets_own_state=any(
            isinstance(statement, ast.FunctionDef) and statement.name == "__setstate__"
            for statement in node.body
        ),
    )
