"""Unknown and malformed ids, in paths and in bodies: 404 or 400 naming the id, nothing stored."""

from __future__ import annotations

import pytest

from tests.factories import client_for

pytestmark = pytest.mark.django_db

UNKNOWN = "00000000-0000-4000-8000-000000000000"

# Every route with an id, with a method that changes state where the route has one.
ROUTES = [
    ("get", "/api/users/{id}/"),
    ("get", "/api/models/{id}/"),
    ("post", "/api/models/{id}/"),
    ("delete", "/api/models/{id}/"),
    ("get", "/api/models/{id}/metadata/"),
    ("get", "/api/models/{id}/metrics/"),
    ("post", "/api/models/{id}/metrics/"),
    ("get", "/api/models/{id}/preprocessing/"),
    ("post", "/api/models/{id}/preprocessing/"),
    ("post", "/api/models/{id}/swag/"),
    ("get", "/api/trainings/{id}/"),
    ("delete", "/api/trainings/{id}/"),
    ("put", "/api/trainings/{id}/clients/"),
    ("delete", "/api/trainings/{id}/clients/"),
    ("post", "/api/trainings/{id}/start/"),
    ("get", "/api/trainings/{id}/models/"),
    ("get", "/api/trainings/{id}/models/latest/"),
]


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_unknown_uuid_is_404_naming_id(world, unchanged, method, route):
    unchanged()

    response = getattr(client_for(world.actor), method)(route.format(id=UNKNOWN))

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "detail" in response.json()
    unchanged()


@pytest.mark.parametrize(("method", "route"), ROUTES)
@pytest.mark.parametrize("malformed", ["not-a-uuid", "1234", UNKNOWN[:-1], "%FF%FE"])
def test_malformed_id_is_json_404(world, unchanged, method, route, malformed):
    unchanged()

    response = getattr(client_for(world.actor), method)(route.format(id=malformed))

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "canonical UUIDs" in response.json()["detail"]
    unchanged()


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
@pytest.mark.parametrize("group_id", ["999999", str(2**70)])
def test_unknown_group_is_404(world, unchanged, method, group_id):
    unchanged()

    response = getattr(client_for(world.actor), method)(
        f"/api/groups/{group_id}/", {"name": "renamed"}, format="json"
    )

    assert response.status_code == 404
    unchanged()


def test_unknown_path_outside_api_keeps_html_404(world):
    response = client_for(world.actor).get("/not-an-api-path/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("url", "body", "field", "fragment"),
    [
        ("/api/trainings/", {"clients": [UNKNOWN]}, "clients", UNKNOWN),
        (
            "/api/trainings/",
            {"clients": ["not-a-uuid"]},
            "clients",
            "'not-a-uuid' is not a valid UUID",
        ),
        (
            "/api/trainings/",
            {"model_id": "not-a-uuid"},
            "model_id",
            "'not-a-uuid' is not a valid UUID",
        ),
        ("/api/groups/", {"members": [UNKNOWN]}, "members", UNKNOWN),
        ("/api/groups/", {"members": ["not-a-uuid"]}, "members", "not-a-uuid"),
        ("/api/models/", {"models": ["not-a-uuid"]}, "models", "'not-a-uuid' is not a valid UUID"),
    ],
)
def test_unknown_id_in_body_is_400(world, unchanged, url, body, field, fragment):
    defaults = {
        "/api/trainings/": {
            "model_id": str(world.model.pk),
            "target_num_updates": 1,
            "aggregation_method": "FedAvg",
        },
        "/api/groups/": {"name": "new group"},
        "/api/models/": {"name": "ensemble", "description": "", "type": "MEAN"},
    }[url]
    unchanged()

    response = client_for(world.actor).post(url, {**defaults, **body}, format="json")

    assert response.status_code == 400
    assert fragment in str(response.json()[field])
    unchanged()


@pytest.mark.parametrize("clients", [[UNKNOWN], ["not-a-uuid"]])
@pytest.mark.parametrize("method", ["put", "delete"])
def test_clients_unknown_ids_is_400(world, unchanged, method, clients):
    world.training.state = "I"
    world.training.save()
    unchanged()

    response = getattr(client_for(world.actor), method)(
        f"/api/trainings/{world.training.pk}/clients/", {"clients": clients}, format="json"
    )

    assert response.status_code == 400
    assert clients[0] in str(response.json())
    unchanged()


def test_inference_unknown_model_names_id(world, unchanged):
    unchanged()

    response = client_for(world.actor).post(
        "/api/inference/", {"model_id": UNKNOWN, "model_input": [[1, 2, 3, 4]]}, format="json"
    )

    assert response.status_code == 404
    assert UNKNOWN in response.json()["detail"]
    unchanged()
