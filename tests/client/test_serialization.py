import io

import pytest
import torch

from fedserve.client import _serialization
from tests.factories import TinyNet


def _torchscript(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def test_detect_torchscript_and_state_dict():
    net = TinyNet()
    assert _serialization.detect_format(_torchscript(net)) == _serialization.TORCHSCRIPT
    state = _serialization.update_bytes(net.state_dict())
    assert _serialization.detect_format(state) == _serialization.STATE_DICT


def test_detect_safetensors():
    from safetensors.torch import save

    data = save({"w": torch.ones(2)})
    assert _serialization.detect_format(data) == _serialization.SAFETENSORS
    assert torch.equal(_serialization.load_state_dict(data)["w"], torch.ones(2))


def test_state_dict_update_loads_weights_only():
    net = TinyNet()
    data = _serialization.update_bytes(net)
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert set(loaded) == set(net.state_dict())
    assert torch.equal(loaded["fc1.weight"], net.fc1.weight)


def test_torchscript_update_from_module():
    net = TinyNet()
    data = _serialization.update_bytes(net, _serialization.TORCHSCRIPT)
    module = torch.jit.load(io.BytesIO(data))
    assert torch.equal(module.state_dict()["fc2.bias"], net.fc2.bias)


def test_torchscript_update_from_state_dict_rejected():
    with pytest.raises(ValueError, match="needs the trained module"):
        _serialization.update_bytes(TinyNet().state_dict(), _serialization.TORCHSCRIPT)


def test_unknown_update_format_rejected():
    with pytest.raises(ValueError, match="Unknown update format 'onnx'"):
        _serialization.update_bytes(TinyNet(), "onnx")


def test_load_model_weights_into_template():
    source, template = TinyNet(), torch.jit.script(TinyNet())
    data = _serialization.update_bytes(source)
    loaded = _serialization.load_model(data, template)
    assert torch.equal(loaded.state_dict()["fc1.weight"], source.fc1.weight)


def test_load_model_weights_without_template_rejected():
    with pytest.raises(ValueError, match="weights only"):
        _serialization.load_model(_serialization.update_bytes(TinyNet()))


def test_load_state_dict_rejects_non_tensor_content():
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    with pytest.raises(ValueError, match="not a state dict"):
        _serialization.load_state_dict(buffer.getvalue())
