import pytest
import torch

from fedserve.uncertainty import ForwardError
from fedserve.uncertainty.base import forward
from tests.uncertainty.helpers import linear, scripted


def test_forward_error_keeps_model_message():
    module = linear([[1.0, 2.0]], [0.0])

    with pytest.raises(ForwardError, match=r"mat1 and mat2 shapes cannot be multiplied"):
        forward(module, torch.ones(1, 3))


def test_forward_error_of_torchscript_drops_interpreter_traceback():
    module = scripted(linear([[1.0, 2.0]], [0.0]))

    with pytest.raises(ForwardError) as raised:
        forward(module, torch.ones(1, 3))

    message = str(raised.value)
    assert message.startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert "Traceback" not in message


def test_forward_rejects_non_tensor_output():
    class TupleNet(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(ForwardError, match="returned tuple"):
        forward(TupleNet(), torch.ones(1, 2))


def test_forward_turns_integer_output_into_float():
    class ArgMax(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.argmax(dim=-1)

    output = forward(ArgMax(), torch.tensor([[0.1, 0.9]]))

    assert output.dtype == torch.float32
    assert output.tolist() == [1.0]
