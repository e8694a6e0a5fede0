"""Malformed multipart bodies on every multipart endpoint: 400, and nothing stored."""

from __future__ import annotations

import pytest

from fedserve.core.models import RoundPhase, TrainingState
from tests.factories import client_for, torchscript_bytes

pytestmark = pytest.mark.django_db

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename:
        disposition += f'; filename="{filename}"'
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    )


def closed(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


FILE = part("model_file", torchscript_bytes(), "m.pt")

MALFORMED = [
    pytest.param(closed(FILE)[:-60], CONTENT_TYPE, "ended before its closing boundary", id="cut"),
    pytest.param(b"no multipart here", CONTENT_TYPE, "malformed", id="no parts"),
    pytest.param(closed(FILE), "multipart/form-data", "no boundary", id="no boundary"),
    pytest.param(
        closed(FILE).replace(BOUNDARY.encode(), b"other"), CONTENT_TYPE, "malformed", id="other"
    ),
    pytest.param(
        f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
        CONTENT_TYPE,
        "Content-Disposition",
        id="no disposition",
    ),
]

ENDPOINTS = {
    "update": ("participant", "/api/models/{model}/"),
    "swag": ("participant", "/api/models/{model}/swag/"),
    "metrics": ("participant", "/api/models/{model}/metrics/"),
    "preprocessing": ("actor", "/api/models/{model}/preprocessing/"),
    "model upload": ("actor", "/api/models/"),
    "inference": ("actor", "/api/inference/"),
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize(("body", "content_type", "fragment"), MALFORMED)
def test_malformed_multipart_is_400(world, unchanged, endpoint, body, content_type, fragment):
    role, template = ENDPOINTS[endpoint]
    if endpoint == "swag":
        world.training.state = TrainingState.SWAG_ROUND
        world.training.phase = RoundPhase.SWAG
        world.training.save()
    unchanged()

    response = client_for(getattr(world, role)).post(
        template.format(model=world.model.pk), body, content_type=content_type
    )

    assert response.status_code == 400
    assert fragment in response.json()["detail"]
    unchanged()
