import io
import math
import pathlib
import zipfile

import pytest
import safetensors.torch
import torch

from fedserve import modelfiles
from fedserve.core.models import FileFormat
from tests.factories import ReadOnlyFile, TinyNet, state_dict_bytes, torchscript_bytes


class MarkerPayload:
    """Unpickling this object creates the marker file, as an attacker's payload would."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def malicious_bytes(marker: pathlib.Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": MarkerPayload(marker)}, buffer)
    return buffer.getvalue()


def pickled_module_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(TinyNet(), buffer)
    return buffer.getvalue()


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return dict(TinyNet().state_dict())


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})


def test_detect_format_by_content():
    legacy = io.BytesIO()
    torch.save(tiny_state_dict(), legacy, _use_new_zipfile_serialization=False)

    assert modelfiles.detect_format(torchscript_bytes()) == FileFormat.TORCHSCRIPT
    assert modelfiles.detect_format(state_dict_bytes(tiny_state_dict())) == FileFormat.STATE_DICT
    assert modelfiles.detect_format(state_dict_bytes(torch.ones(3))) == FileFormat.STATE_DICT
    assert modelfiles.detect_format(legacy.getvalue()) == FileFormat.STATE_DICT
    assert modelfiles.detect_format(safetensors_bytes(tiny_state_dict())) == (
        FileFormat.SAFETENSORS
    )
    assert modelfiles.detect_format(pickled_module_bytes()) == FileFormat.PICKLED_MODULE


@pytest.mark.parametrize(
    "content",
    [b"", b"short", b"not a model file at all", b"PK\x03\x04broken zip archive"],
)
def test_detect_format_rejects_other_bytes(content):
    with pytest.raises(modelfiles.ModelFileError, match="Accepted formats: a TorchScript"):
        modelfiles.detect_format(content)


def test_detect_format_rejects_plain_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("folder/readme.txt", "hello")
    with pytest.raises(modelfiles.ModelFileError, match="neither a TorchScript"):
        modelfiles.detect_format(buffer.getvalue())


def test_load_module_torchscript_on_meta_reads_no_weights():
    module = modelfiles.load_module(torchscript_bytes(), map_location="meta")

    assert module.fc1.weight.device.type == "meta"
    assert modelfiles.count_float_parameters(module) == 4 * 8 + 8 + 8 * 3 + 3


def test_load_module_rejects_weights_only_file():
    with pytest.raises(modelfiles.ModelFileError, match="needs an architecture"):
        modelfiles.load_module(state_dict_bytes(tiny_state_dict()))


def test_load_module_pickled_only_when_enabled(settings):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = False
    with pytest.raises(modelfiles.ModelFileError, match="FEDSERVE_ALLOW_PICKLED_MODULES is off"):
        modelfiles.load_module(pickled_module_bytes())

    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    module = modelfiles.load_module(pickled_module_bytes())
    assert isinstance(module, TinyNet)


def test_malicious_pickle_never_runs(tmp_path, settings):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = False
    marker = tmp_path / "marker"
    content = malicious_bytes(marker)

    assert modelfiles.detect_format(content) == FileFormat.PICKLED_MODULE
    for load in (modelfiles.load_module, modelfiles.load_state_dict, modelfiles.load_tensor):
        with pytest.raises(modelfiles.ModelFileError, match="does not unpickle"):
            load(content)
    with pytest.raises(modelfiles.ModelFileError):
        modelfiles.load_state_dict(content, FileFormat.STATE_DICT)
    assert not marker.exists()


def test_load_state_dict_from_every_format():
    reference = tiny_state_dict()
    module = TinyNet()
    module.load_state_dict(reference)
    sources = [
        torchscript_bytes(module),
        state_dict_bytes(reference),
        safetensors_bytes(reference),
    ]
    for source in sources:
        loaded = modelfiles.load_state_dict(source)
        assert loaded.keys() == reference.keys()
        for key, tensor in reference.items():
            assert torch.equal(loaded[key], tensor), key


def test_load_state_dict_on_meta_keeps_shapes():
    for source in (state_dict_bytes(tiny_state_dict()), safetensors_bytes(tiny_state_dict())):
        loaded = modelfiles.load_state_dict(source, map_location="meta")
        assert loaded["fc1.weight"].device.type == "meta"
        assert loaded["fc1.weight"].shape == (8, 4)


def test_load_state_dict_rejects_non_tensor_values():
    with pytest.raises(modelfiles.ModelFileError, match="maps names"):
        modelfiles.load_state_dict(state_dict_bytes({"a": torch.ones(2), "epoch": 3}))
    with pytest.raises(modelfiles.ModelFileError, match="not a state dict"):
        modelfiles.load_state_dict(state_dict_bytes([torch.ones(2)]))


def test_load_tensor_from_torch_save_and_safetensors():
    tensor = torch.arange(5, dtype=torch.float32)
    assert torch.equal(modelfiles.load_tensor(state_dict_bytes(tensor)), tensor)
    assert torch.equal(modelfiles.load_tensor(safetensors_bytes({"t": tensor})), tensor)


def test_load_tensor_rejects_state_dict_and_module():
    with pytest.raises(modelfiles.ModelFileError, match="not a single tensor"):
        modelfiles.load_tensor(state_dict_bytes(tiny_state_dict()))
    with pytest.raises(modelfiles.ModelFileError, match="not a single tensor"):
        modelfiles.load_tensor(torchscript_bytes())


def test_save_state_dict_round_trip():
    buffer = io.BytesIO()
    modelfiles.save_state_dict(tiny_state_dict(), buffer)

    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(loaded) == set(tiny_state_dict())


def test_save_tensor_round_trip():
    buffer = io.BytesIO()
    modelfiles.save_tensor(torch.ones(4), buffer)
    assert torch.equal(modelfiles.load_tensor(buffer.getvalue()), torch.ones(4))


def test_map_state_dict_reads_mapped_tensors(tmp_path):
    path = tmp_path / "update.pt"
    state = tiny_state_dict()
    torch.save(state, path)

    mapped = modelfiles.map_state_dict(str(path))

    assert mapped is not None
    assert list(mapped) == list(state)
    for key, tensor in state.items():
        assert torch.equal(mapped[key], tensor)


def test_map_state_dict_declines_unmappable_files(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save(tiny_state_dict(), legacy, _use_new_zipfile_serialization=False)
    single = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), single)

    assert modelfiles.map_state_dict(str(legacy)) is None
    assert modelfiles.map_state_dict(str(single)) is None


def test_map_state_dict_never_runs_pickles(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "malicious.pt"
    path.write_bytes(malicious_bytes(marker))

    assert modelfiles.map_state_dict(str(path)) is None
    assert not marker.exists()


@pytest.mark.parametrize("fmt", [FileFormat.TORCHSCRIPT, FileFormat.PICKLED_MODULE])
def test_save_module_to_path(tmp_path, settings, fmt):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    path = tmp_path / "module.pt"
    module = (
        modelfiles.load_module(torchscript_bytes()) if fmt == FileFormat.TORCHSCRIPT else TinyNet()
    )

    modelfiles.save_module(module, fmt, str(path))

    assert modelfiles.detect_format(path.read_bytes()) == fmt
    assert modelfiles.load_module(path.read_bytes())(torch.ones(1, 4)).shape == (1, 3)


def test_save_module_rejects_weights_formats(tmp_path):
    with pytest.raises(modelfiles.ModelFileError, match="does not contain a module"):
        modelfiles.save_module(TinyNet(), FileFormat.STATE_DICT, str(tmp_path / "x.pt"))


def test_write_module_with_weights_keeps_torchscript():
    source = torchscript_bytes()
    zeros = {key: torch.zeros_like(value) for key, value in tiny_state_dict().items()}
    destination = io.BytesIO()

    modelfiles.write_module_with_weights(source, FileFormat.TORCHSCRIPT, zeros, destination)

    written = destination.getvalue()
    assert modelfiles.detect_format(written) == FileFormat.TORCHSCRIPT
    module = modelfiles.load_module(written)
    assert torch.count_nonzero(module.fc1.weight) == 0
    assert module(torch.ones(1, 4)).shape == (1, 3)


def test_write_module_with_weights_is_strict():
    partial = {"fc1.weight": torch.zeros(8, 4)}
    with pytest.raises(RuntimeError):
        modelfiles.write_module_with_weights(
            torchscript_bytes(), FileFormat.TORCHSCRIPT, partial, io.BytesIO()
        )


@pytest.mark.parametrize("to_bytes", [state_dict_bytes, safetensors_bytes])
def test_find_non_finite_names_tensor_and_problem(to_bytes):
    state = tiny_state_dict()
    assert modelfiles.find_non_finite(to_bytes(state)) is None

    state["fc2.bias"] = torch.tensor([0.0, float("inf"), 1.0])
    assert modelfiles.find_non_finite(to_bytes(state)) == "'fc2.bias' contains infinite values"

    state["fc1.weight"] = torch.full((8, 4), float("nan"))
    assert modelfiles.find_non_finite(to_bytes(state)) == "'fc1.weight' contains NaN values"


def test_find_non_finite_reads_slices_and_torchscript():
    base = torch.zeros(10)
    base[0] = float("nan")
    # The slice saved here shares storage with a NaN outside the slice, which is not its data.
    assert modelfiles.find_non_finite(state_dict_bytes({"part": base[1:]})) is None

    module = TinyNet()
    with torch.no_grad():
        module.fc2.weight[0, 0] = float("nan")
    assert modelfiles.find_non_finite(torchscript_bytes(module)) == (
        "'fc2.weight' contains NaN values"
    )


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
@pytest.mark.parametrize("position", [0, 15, 16, 17, 999])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_find_non_finite_in_any_chunk(monkeypatch, dtype, position, value):
    # 64-byte chunks put the values at the start, middle and end of chunks.
    monkeypatch.setattr(modelfiles.values, "_SCAN_CHUNK_BYTES", 64)
    state = {"a": torch.ones(3, dtype=dtype), "b": torch.ones(1000, dtype=dtype)}
    state["b"][position] = value
    expected = "'b' contains NaN values" if math.isnan(value) else "'b' contains infinite values"

    for content in (state_dict_bytes(state), safetensors_bytes(state)):
        assert modelfiles.find_non_finite(content) == expected
        assert modelfiles.find_non_finite(ReadOnlyFile(io.BytesIO(content))) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_find_non_finite_accepts_sums_that_overflow(dtype):
    largest = torch.finfo(dtype).max
    state = {"w": torch.full((4096,), largest, dtype=dtype), "v": torch.ones(3, dtype=dtype)}
    state["w"][1::2] = largest / 2

    assert modelfiles.find_non_finite(state_dict_bytes(state)) is None
    assert modelfiles.find_non_finite(safetensors_bytes(state)) is None
    assert modelfiles.find_non_finite(torchscript_bytes(TinyNet())) is None


def test_find_non_finite_detects_truncated_data():
    content = safetensors_bytes({"w": torch.ones(1000)})
    with pytest.raises(modelfiles.ModelFileError):
        modelfiles.find_non_finite(content[:-100])


def test_describe_mismatch():
    reference = tiny_state_dict()
    assert modelfiles.describe_mismatch(reference, tiny_state_dict()) is None

    missing = {k: v for k, v in reference.items() if k != "fc2.bias"}
    assert modelfiles.describe_mismatch(reference, missing) == "missing keys 'fc2.bias'"

    extra = {**reference, "fc3.weight": torch.ones(1)}
    assert modelfiles.describe_mismatch(reference, extra) == "unexpected keys 'fc3.weight'"

    reshaped = {**reference, "fc1.weight": torch.zeros(8, 5)}
    assert modelfiles.describe_mismatch(reference, reshaped) == (
        "'fc1.weight' has shape [8, 5], but the global model's has [8, 4]"
    )

    retyped = {**reference, "fc1.bias": torch.zeros(8, dtype=torch.float64)}
    assert modelfiles.describe_mismatch(reference, retyped) == (
        "'fc1.bias' has dtype torch.float64, but the global model's has torch.float32"
    )


def test_accepted_formats_mentions_pickles_only_when_enabled(settings):
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = False
    assert "nn.Module" not in modelfiles.accepted_formats()
    settings.FEDSERVE_ALLOW_PICKLED_MODULES = True
    assert "nn.Module" in modelfiles.accepted_formats()


def test_check_module_file_loads_small_archives():
    assert modelfiles.check_module_file(torchscript_bytes()) == FileFormat.TORCHSCRIPT
    with pytest.raises(modelfiles.ModelFileError, match="needs an architecture"):
        modelfiles.check_module_file(state_dict_bytes(tiny_state_dict()))


def test_check_module_file_large_archive_checks_structure(monkeypatch):
    monkeypatch.setattr(modelfiles.loading, "MODULE_CHECK_MAX_TENSOR_BYTES", 16)

    def no_load(*args, **kwargs):
        raise AssertionError("a large archive must not be loaded")

    monkeypatch.setattr(modelfiles.loading, "load_module", no_load)
    assert modelfiles.check_module_file(torchscript_bytes()) == FileFormat.TORCHSCRIPT

    damaged = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(torchscript_bytes())) as source,
        zipfile.ZipFile(damaged, "w") as target,
    ):
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = b"\x80\x02 not a pickle"
            target.writestr(info, data)
    with pytest.raises(modelfiles.ModelFileError, match=r"data\.pkl is damaged"):
        modelfiles.check_module_file(damaged.getvalue())


class Buffers(torch.nn.Module):
    """A TorchScript-ready module whose state dict is the given tensors, kept as buffers."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture
def no_jit_load(monkeypatch):
    """Fail a test that loads a TorchScript archive instead of reading its records."""

    def full_load(*args, **kwargs):
        raise AssertionError("find_non_finite loaded the archive with torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", full_load)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
@pytest.mark.parametrize("position", [0, 15, 16, 17, 999])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_find_non_finite_torchscript_any_chunk(monkeypatch, no_jit_load, dtype, position, value):
    # 64-byte chunks put the values at the start, middle and end of chunks.
    monkeypatch.setattr(modelfiles.values, "_SCAN_CHUNK_BYTES", 64)
    state = {"a": torch.ones(3, dtype=dtype), "b": torch.ones(1000, dtype=dtype)}
    state["b"][position] = value
    expected = "'b' contains NaN values" if math.isnan(value) else "'b' contains infinite values"
    content = torchscript_bytes(Buffers(state))

    assert modelfiles.find_non_finite(content) == expected
    assert modelfiles.find_non_finite(ReadOnlyFile(io.BytesIO(content))) == expected


def test_find_non_finite_torchscript_views(no_jit_load):
    base = torch.zeros(10)
    base[0] = float("nan")
    transposed = torch.zeros(3, 4)
    transposed[2, 1] = float("inf")
    tied = TinyNet()
    tied.fc2.weight = torch.nn.Parameter(torch.zeros(3, 8))
    tied.register_parameter("head", tied.fc2.weight)

    # The slice shares storage with a NaN outside the slice, which is not its data.
    assert modelfiles.find_non_finite(torchscript_bytes(Buffers({"part": base[1:]}))) is None
    assert modelfiles.find_non_finite(torchscript_bytes(Buffers({"whole": base}))) == (
        "'whole' contains NaN values"
    )
    assert modelfiles.find_non_finite(torchscript_bytes(Buffers({"t": transposed.t()}))) == (
        "'t' contains infinite values"
    )
    assert modelfiles.find_non_finite(torchscript_bytes(tied)) is None
    with torch.no_grad():
        tied.head[1, 1] = float("nan")
    assert modelfiles.find_non_finite(torchscript_bytes(tied)) == "'head' contains NaN values"


def compress_tensor_records(content: bytes) -> bytes:
    compressed = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(content)) as source,
        zipfile.ZipFile(compressed, "w") as target,
    ):
        for info in source.infolist():
            data = source.read(info.filename)
            if "/data/" in info.filename:
                info.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(info, data)
    return compressed.getvalue()


def test_find_non_finite_torchscript_falls_back_to_load(caplog):
    module = TinyNet()
    with torch.no_grad():
        module.fc1.bias[3] = float("-inf")
    content = compress_tensor_records(torchscript_bytes(module))

    with caplog.at_level("INFO", logger="fedserve.modelfiles"):
        problem = modelfiles.find_non_finite(content, FileFormat.TORCHSCRIPT)

    assert problem == "'fc1.bias' contains infinite values"
    assert "data/0 is compressed" in caplog.text
