"""Factories for test records and model files."""

from __future__ import annotations

import io
import itertools
from typing import IO, Any

import torch
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fedserve.core.models import Model, ModelKind, Training, User

_counter = itertools.count()


class TinyNet(torch.nn.Module):
    """A 4-in, 3-out classifier with a dropout layer, small enough for fast tests."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.dropout = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


def torchscript_bytes(module: torch.nn.Module | None = None) -> bytes:
    """Return a TorchScript archive of `module` (a fresh TinyNet by default)."""
    module = module if module is not None else TinyNet()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


class ReadOnlyFile:
    """A binary file with read and seek only: no name, descriptor or readinto.

    torch.jit.load reads such a file whole into memory, unlike a file that has a path.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def make_user(**fields: Any) -> User:
    """Create a user with a token; username and password default to unique values."""
    number = next(_counter)
    fields.setdefault("username", f"user{number}")
    password = fields.pop("password", "pw-" + fields["username"])
    user = User.objects.create_user(password=password, **fields)
    Token.objects.create(user=user)
    return user


def client_for(user: User | None) -> APIClient:
    """Return an API client authenticated with the user's token (anonymous for None)."""
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get(user=user).key}")
    return client


def make_global_model(owner: User, **fields: Any) -> Model:
    """Create a GLOBAL model row with a stored TinyNet TorchScript file."""
    from django.core.files.base import ContentFile

    from fedserve import modelstore

    model = Model.objects.create(
        owner=owner,
        kind=fields.pop("kind", ModelKind.GLOBAL),
        name=fields.pop("name", "tiny"),
        description=fields.pop("description", "test model"),
        input_shape=fields.pop("input_shape", [None, 4]),
        **fields,
    )
    path = modelstore.save(
        modelstore.model_file_path(model.pk, "weights.pt"), ContentFile(torchscript_bytes())
    )
    model.weights_path = path
    model.weights_format = "torchscript"
    model.weights_size = modelstore.size(path)
    model.save()
    return model


def make_training(actor: User, participants: list[User], **fields: Any) -> Training:
    model = fields.pop("model", None) or make_global_model(actor)
    training = Training.objects.create(
        model=model,
        actor=actor,
        target_num_updates=fields.pop("target_num_updates", 2),
        aggregation_method=fields.pop("aggregation_method", "FedAvg"),
        **fields,
    )
    training.participants.set(participants)
    return training
