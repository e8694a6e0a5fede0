"""Small modules with known weights for the uncertainty tests."""

from __future__ import annotations

import io

import torch


def linear(weight: list[list[float]], bias: list[float]) -> torch.nn.Linear:
    """Return a Linear layer with the given weight and bias."""
    layer = torch.nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def scripted(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """Return the module as it comes back from a TorchScript archive."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


class DropoutNet(torch.nn.Module):
    """Linear, dropout, BatchNorm and linear: dropout must vary, BatchNorm must not train."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 16)
        self.dropout = torch.nn.Dropout(dropout)
        self.norm = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.dropout(torch.relu(self.fc1(x)))))


class NormNet(torch.nn.Module):
    """Linear and BatchNorm without dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def with_running_statistics(module: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm layer running statistics far from the batch statistics."""
    for submodule in module.modules():
        if isinstance(submodule, torch.nn.BatchNorm1d):
            with torch.no_grad():
                submodule.running_mean.fill_(3.0)
                submodule.running_var.fill_(4.0)
    return module
