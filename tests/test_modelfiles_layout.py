"""The state dict layout of model files, read without their tensor data."""

import io
import json
import logging
import pathlib
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from fedserve import modelfiles
from fedserve.core.models import FileFormat
from tests.factories import TinyNet, state_dict_bytes

PROBE = pathlib.Path(__file__).with_name("layout_memory_probe.py")
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Block(torch.nn.Module):
    """Linear, BatchNorm, a non-persistent buffer and a tensor that is neither."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.ones(4), persistent=False)
        self.offset = torch.zeros(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x)) * self.scale + self.offset


class Nested(torch.nn.Module):
    """Submodules in attributes, a Sequential and a ModuleList, with a shared parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Block()
        self.second = Block()
        self.second.linear.weight = self.first.linear.weight
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False) for _ in range(2)])
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.first(x) + self.second(x))
        for layer in self.layers:
            x = layer(x)
        return x


class SharedBlock(torch.nn.Module):
    """One submodule under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Block()
        self.decoder = self.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[:, :3])


class ConvNet(torch.nn.Module):
    """Convolutions with BatchNorm2d in a Sequential, and float64 and float16 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        )
        self.classifier = torch.nn.Linear(8, 2).double()
        self.register_buffer("mask", torch.ones(8, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3)) * self.mask.float()
        return self.classifier(pooled.double()).float()


class OwnState(torch.nn.Module):
    """A module that writes and restores its own state, which the layout reader leaves alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 2))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return (self.weight, self.count, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.count = state[1]
        self.training = state[2]


def scripted(module: torch.nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(module)


def traced(module: torch.nn.Module) -> torch.jit.ScriptModule:
    input_shapes = {TinyNet: (2, 4), ConvNet: (2, 3, 6, 6)}
    example = torch.randn(input_shapes.get(type(module), (2, 3)))
    return torch.jit.trace(module.eval(), example)


def archive_bytes(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def layout_of(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, list[int], torch.dtype]]:
    return [(key, list(tensor.shape), tensor.dtype) for key, tensor in state_dict.items()]


@pytest.fixture
def no_full_load(monkeypatch):
    """Fail a test that loads the module instead of reading its layout."""

    def full_load(*args, **kwargs):
        raise AssertionError("the layout reader fell back to torch.jit.load")

    monkeypatch.setattr(modelfiles.layout, "load_state_dict", full_load)


@pytest.mark.parametrize("compile_module", [scripted, traced])
@pytest.mark.parametrize("module_class", [TinyNet, Block, Nested, SharedBlock, ConvNet])
def test_layout_matches_loaded_state_dict(compile_module, module_class, no_full_load):
    content = archive_bytes(compile_module(module_class()))
    expected = layout_of(dict(torch.jit.load(io.BytesIO(content)).state_dict()))

    layout = modelfiles.read_state_dict_layout(content, FileFormat.TORCHSCRIPT)

    assert layout_of(layout) == expected
    assert {tensor.device.type for tensor in layout.values()} == {"meta"}


def tensor_list_layout(tensors) -> list[tuple[list[int], torch.dtype, bool]]:
    return [(list(tensor.shape), tensor.dtype, tensor.requires_grad) for tensor in tensors]


@pytest.mark.parametrize("compile_module", [scripted, traced])
@pytest.mark.parametrize("module_class", [TinyNet, Block, Nested, SharedBlock, ConvNet])
def test_module_layout_matches_loaded_module(compile_module, module_class, monkeypatch):
    module = module_class()
    next(module.parameters()).requires_grad_(False)
    content = archive_bytes(compile_module(module))
    loaded = torch.jit.load(io.BytesIO(content))
    monkeypatch.setattr(torch.jit, "load", None)

    layout = modelfiles.read_module_layout(content, FileFormat.TORCHSCRIPT)

    assert tensor_list_layout(layout.parameters) == tensor_list_layout(loaded.parameters())
    assert tensor_list_layout(layout.buffers) == tensor_list_layout(loaded.buffers())
    assert modelfiles.count_float_parameters(layout.parameters) == (
        modelfiles.count_float_parameters(loaded)
    )


def test_module_layout_own_state_falls_back():
    content = archive_bytes(scripted(OwnState()))
    loaded = torch.jit.load(io.BytesIO(content))

    layout = modelfiles.read_module_layout(content)

    assert tensor_list_layout(layout.parameters) == tensor_list_layout(loaded.parameters())
    assert tensor_list_layout(layout.buffers) == tensor_list_layout(loaded.buffers())


def test_layout_order_and_skipped_attributes(no_full_load):
    layout = modelfiles.read_state_dict_layout(archive_bytes(scripted(Nested())))

    assert list(layout)[:8] == [
        "steps",
        "first.scale",
        "first.linear.weight",
        "first.linear.bias",
        "first.norm.weight",
        "first.norm.bias",
        "first.norm.running_mean",
        "first.norm.running_var",
    ]
    assert layout["first.norm.num_batches_tracked"].dtype == torch.int64
    assert "second.linear.weight" in layout
    assert "layers.1.weight" in layout
    assert "layers.1.bias" not in layout
    assert not [key for key in layout if key.endswith("offset")]


def test_layout_of_module_with_own_state_falls_back(caplog):
    content = archive_bytes(scripted(OwnState()))
    expected = layout_of(dict(torch.jit.load(io.BytesIO(content)).state_dict()))

    with caplog.at_level(logging.INFO, logger="fedserve.modelfiles"):
        layout = modelfiles.read_state_dict_layout(content)

    assert layout_of(layout) == expected
    assert "restores its own state" in caplog.text


def test_layout_of_weights_only_formats():
    state = dict(TinyNet().state_dict())

    layout = modelfiles.read_state_dict_layout(state_dict_bytes(state))

    assert layout_of(layout) == layout_of(state)
    assert {tensor.device.type for tensor in layout.values()} == {"meta"}


def replace_record(content: bytes, suffix: str, data: bytes | None) -> bytes:
    """Replace the archive record whose name ends with `suffix`, or drop it for None."""
    replaced = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(content)) as source,
        zipfile.ZipFile(replaced, "w") as target,
    ):
        for info in source.infolist():
            if not info.filename.endswith(suffix):
                target.writestr(info, source.read(info.filename))
            elif data is not None:
                target.writestr(info, data)
    return replaced.getvalue()


def replace_data_pickle(content: bytes, data: bytes) -> bytes:
    return replace_record(content, "/data.pkl", data)


class MarkerPayload:
    """Unpickling this object creates the marker file, as an attacker's payload would."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_layout_reader_never_runs_pickled_callables(tmp_path, caplog):
    marker = tmp_path / "marker"
    payload = pickle.dumps({"weight": MarkerPayload(marker)}, protocol=2)
    content = replace_data_pickle(archive_bytes(scripted(TinyNet())), payload)

    with (
        caplog.at_level(logging.INFO, logger="fedserve.modelfiles"),
        pytest.raises(modelfiles.ModelFileError, match="cannot be loaded"),
    ):
        modelfiles.read_state_dict_layout(content, FileFormat.TORCHSCRIPT)

    assert not marker.exists()
    assert "data.pkl refers to" in caplog.text


@pytest.mark.parametrize(
    "data",
    [b"\x80\x02 not a pickle", pickle.dumps({"weight": 1}, protocol=2), b""],
)
def test_layout_of_damaged_archive_is_model_file_error(data):
    content = replace_data_pickle(archive_bytes(scripted(TinyNet())), data)

    with pytest.raises(modelfiles.ModelFileError):
        modelfiles.read_state_dict_layout(content, FileFormat.TORCHSCRIPT)


def run_probe(tmp_path: pathlib.Path, *args: str) -> dict[str, int]:
    completed = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "OMP_NUM_THREADS": "2",
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "FEDSERVE_DATA_DIR": str(tmp_path / "data"),
        },
    )
    return json.loads(completed.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status"
)
def test_layout_memory_far_below_model_size(tmp_path):
    figures = run_probe(tmp_path)

    assert figures["keys"] == 2
    assert figures["growth"] < figures["model_bytes"] / 20, figures


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status"
)
def test_layout_memory_probe_sees_full_load(tmp_path):
    figures = run_probe(tmp_path, "--full-load")

    assert figures["keys"] == 2
    assert figures["growth"] > figures["model_bytes"] / 2, figures


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status"
)
def test_value_scan_memory_far_below_model_size(tmp_path):
    figures = run_probe(tmp_path, "--scan")

    assert figures["problem"] is None
    # The scan reads into one 8 MiB buffer. The probe's file has no readinto, so each chunk
    # also passes through an 8 MiB bytes object: about 16 MiB of a 128 MiB model.
    assert figures["growth"] < figures["model_bytes"] / 4, figures


def test_layout_of_class_without_code_falls_back(caplog):
    content = archive_bytes(scripted(TinyNet()))
    without_dropout = replace_record(content, "/code/__torch__/torch/nn/modules/dropout.py", None)

    with (
        caplog.at_level(logging.INFO, logger="fedserve.modelfiles"),
        pytest.raises(modelfiles.ModelFileError),
    ):
        modelfiles.read_state_dict_layout(without_dropout, FileFormat.TORCHSCRIPT)

    assert "does not declare __torch__.torch.nn.modules.dropout.Dropout" in caplog.text


def test_layout_of_module_containing_itself_falls_back(caplog):
    # A TinyNet whose attribute "loop" is the TinyNet itself (memo entry 1).
    loop = (
        b"\x80\x02c__torch__.tests.factories\nTinyNet\nq\x00)\x81q\x01}q\x02("
        b"X\x08\x00\x00\x00trainingq\x03\x88X\x04\x00\x00\x00loopq\x04h\x01ub."
    )
    content = replace_data_pickle(archive_bytes(scripted(TinyNet())), loop)

    with (
        caplog.at_level(logging.INFO, logger="fedserve.modelfiles"),
        pytest.raises(modelfiles.ModelFileError),
    ):
        modelfiles.read_state_dict_layout(content, FileFormat.TORCHSCRIPT)

    assert "loop contains itself" in caplog.text
