"""Users endpoints: registration, listing, one's own user, groups and trainings."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from rest_framework.authtoken.models import Token

from fedserve.core.models import User
from tests.factories import client_for, make_training, make_user

pytestmark = pytest.mark.django_db

USER_FIELDS = {
    "id",
    "username",
    "first_name",
    "last_name",
    "email",
    "actor",
    "client",
    "message_endpoint",
    "token",
}


def register(**fields):
    body = {"username": "alice", "password": "s3cret-pass", **fields}
    return client_for(None).post("/api/users/", body, format="json")


def test_registration_returns_user_with_token():
    response = register(email="alice@localhost", actor=True)

    assert response.status_code == 201
    body = response.json()
    assert set(body) == USER_FIELDS
    assert body["username"] == "alice"
    assert body["actor"] is True
    assert "password" not in body
    user = User.objects.get(pk=body["id"])
    assert Token.objects.get(user=user).key == body["token"]
    assert user.check_password("s3cret-pass")


def test_registration_token_authenticates():
    token = register().json()["token"]

    client = client_for(None)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    response = client.get("/api/users/myself/")

    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_registration_never_grants_staff_or_superuser():
    response = register(is_staff=True, is_superuser=True)

    assert response.status_code == 201
    user = User.objects.get(pk=response.json()["id"])
    assert user.is_staff is False
    assert user.is_superuser is False


def test_registration_with_invalid_token_is_401():
    client = client_for(None)
    client.credentials(HTTP_AUTHORIZATION="Token 0000000000000000000000000000000000000000")

    response = client.post("/api/users/", {"username": "alice", "password": "pw"}, format="json")

    assert response.status_code == 401
    assert not User.objects.filter(username="alice").exists()


def test_registration_closed_is_403(settings):
    settings.FEDSERVE_OPEN_REGISTRATION = False

    response = register()

    assert response.status_code == 403
    assert "Registration is closed" in response.json()["detail"]
    assert not User.objects.filter(username="alice").exists()


def test_registration_closed_allows_superuser(settings):
    settings.FEDSERVE_OPEN_REGISTRATION = False
    admin = make_user(is_superuser=True)

    response = client_for(admin).post(
        "/api/users/", {"username": "bob", "password": "pw"}, format="json"
    )

    assert response.status_code == 201
    # The token belongs to the new user, so it is shown to the registering superuser once.
    assert response.json()["token"] == Token.objects.get(user__username="bob").key


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"password": ""}, "password"),
        ({"password": None}, "password"),
        ({"username": ""}, "username"),
        ({"username": "has space"}, "username"),
        ({"message_endpoint": "ftp://127.0.0.1/inbox"}, "message_endpoint"),
        ({"message_endpoint": "file:///etc/passwd"}, "message_endpoint"),
        ({"message_endpoint": "not a url"}, "message_endpoint"),
        ({"email": "not-an-email"}, "email"),
    ],
)
def test_registration_rejects_invalid_field(fields, field):
    response = register(**fields)

    assert response.status_code == 400
    assert field in response.json()
    assert not User.objects.exists()
    assert not Token.objects.exists()


def test_registration_without_password_is_400():
    response = client_for(None).post("/api/users/", {"username": "alice"}, format="json")

    assert response.status_code == 400
    assert "password" in response.json()


def test_registration_duplicate_username_is_400():
    make_user(username="alice")

    response = register()

    assert response.status_code == 400
    assert "username" in response.json()
    assert User.objects.filter(username="alice").count() == 1


def test_message_endpoint_scheme_error_names_value():
    response = register(message_endpoint="ftp://127.0.0.1/inbox")

    message = response.json()["message_endpoint"][0]
    assert "ftp://127.0.0.1/inbox" in message
    assert "http" in message


@pytest.mark.parametrize("endpoint", ["", "http://127.0.0.1:9000/hook", "https://127.0.0.1/n"])
def test_registration_accepts_message_endpoint(endpoint):
    response = register(message_endpoint=endpoint)

    assert response.status_code == 201
    assert response.json()["message_endpoint"] == endpoint


def test_user_list_shows_only_own_token():
    caller = make_user()
    other = make_user()

    response = client_for(caller).get("/api/users/")

    assert response.status_code == 200
    by_id = {item["id"]: item for item in response.json()}
    assert by_id[str(caller.pk)]["token"] == Token.objects.get(user=caller).key
    assert by_id[str(other.pk)]["token"] is None
    assert all("password" not in item for item in by_id.values())
    assert Token.objects.get(user=other).key not in response.content.decode()


def test_user_detail_token_only_for_caller():
    caller = make_user()
    other = make_user()
    client = client_for(caller)

    own = client.get(f"/api/users/{caller.pk}/").json()
    foreign = client.get(f"/api/users/{other.pk}/").json()

    assert own["token"] == Token.objects.get(user=caller).key
    assert foreign["token"] is None
    assert foreign["username"] == other.username
    assert "password" not in foreign


def test_user_detail_unknown_is_404():
    response = client_for(make_user()).get("/api/users/00000000-0000-0000-0000-000000000000/")

    assert response.status_code == 404
    assert "detail" in response.json()


def test_myself_creates_missing_token():
    admin = User.objects.create_superuser("root", "root@localhost", "root-pass")
    client = client_for(None)
    client.credentials(HTTP_AUTHORIZATION="Basic cm9vdDpyb290LXBhc3M=")  # root:root-pass

    response = client.get("/api/users/myself/")

    assert response.status_code == 200
    assert response.json()["token"] == Token.objects.get(user=admin).key


def test_my_groups_lists_memberships():
    user = make_user()
    mine = Group.objects.create(name="hospital-a")
    Group.objects.create(name="hospital-b")
    user.groups.add(mine)

    response = client_for(user).get("/api/users/groups/")

    assert response.status_code == 200
    assert response.json() == [{"id": mine.pk, "name": "hospital-a"}]


def test_my_trainings_lists_actor_and_participant():
    user = make_user()
    other = make_user()
    acting = make_training(user, [other])
    joined = make_training(other, [user])
    make_training(other, [])
    both = make_training(user, [user])

    response = client_for(user).get("/api/users/trainings/")

    assert response.status_code == 200
    ids = [item["id"] for item in response.json()]
    assert sorted(ids) == sorted(str(t.pk) for t in (acting, joined, both))
