"""Bodies sent with a content type the endpoint does not parse: 415 naming the type."""

from __future__ import annotations

import pytest

from tests.factories import client_for

pytestmark = pytest.mark.django_db


def url_of(world, template: str) -> str:
    return template.format(model=world.model.pk, training=world.training.pk)


@pytest.mark.parametrize(
    ("method", "template", "content_type"),
    [
        ("post", "/api/users/", "text/plain"),
        ("post", "/api/users/", "application/octet-stream"),
        ("post", "/api/groups/", "application/xml"),
        ("post", "/api/models/", "application/x-www-form-urlencoded"),
        ("post", "/api/models/", "text/csv"),
        ("post", "/api/models/{model}/", "application/json"),
        ("post", "/api/models/{model}/", "application/x-www-form-urlencoded"),
        ("post", "/api/models/{model}/metrics/", "text/plain"),
        ("post", "/api/models/{model}/preprocessing/", "application/json"),
        ("post", "/api/trainings/", "application/yaml"),
        ("put", "/api/trainings/{training}/clients/", "text/plain"),
        ("post", "/api/inference/", "application/xml"),
        ("post", "/api/inference/", "image/png"),
    ],
)
def test_unsupported_content_type_is_415(world, unchanged, method, template, content_type):
    uploads_update = template in ("/api/models/{model}/", "/api/models/{model}/metrics/")
    client = client_for(world.participant if uploads_update else world.actor)
    unchanged()

    response = getattr(client, method)(
        url_of(world, template), b"some body", content_type=content_type
    )

    assert response.status_code == 415
    assert f'Unsupported media type "{content_type}"' in response.json()["detail"]
    unchanged()


def test_swag_with_form_encoding_is_415(world, unchanged):
    world.training.state = "S"
    world.training.phase = "SWAG"
    world.training.save()
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/swag/",
        "round=2&sample_size=1",
        content_type="application/x-www-form-urlencoded",
    )

    assert response.status_code == 415
    assert "application/x-www-form-urlencoded" in response.json()["detail"]
    unchanged()


def test_multipart_without_boundary_is_400(world, unchanged):
    unchanged()

    response = client_for(world.participant).post(
        f"/api/models/{world.model.pk}/", b"--x--\r\n", content_type="multipart/form-data"
    )

    assert response.status_code == 400
    assert "boundary" in response.json()["detail"]
    unchanged()


def test_json_declared_but_form_sent_is_400(world, unchanged):
    unchanged()

    response = client_for(world.actor).post(
        "/api/trainings/", b"model_id=x&target_num_updates=1", content_type="application/json"
    )

    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    unchanged()
