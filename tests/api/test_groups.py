"""Groups endpoints: list for superusers, create for anyone, manage for members."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from tests.factories import client_for, make_user

pytestmark = pytest.mark.django_db


def make_group(*members, name="lab"):
    group = Group.objects.create(name=name)
    group.user_set.set(members)
    return group


def test_create_group_makes_caller_member():
    user = make_user()

    response = client_for(user).post("/api/groups/", {"name": "lab"}, format="json")

    assert response.status_code == 201
    group = Group.objects.get(pk=response.json()["id"])
    assert group.name == "lab"
    assert list(group.user_set.all()) == [user]
    assert response.json()["members"] == [str(user.pk)]


def test_create_group_with_members():
    user = make_user()
    other = make_user()

    response = client_for(user).post(
        "/api/groups/", {"name": "lab", "members": [str(other.pk)]}, format="json"
    )

    assert response.status_code == 201
    group = Group.objects.get(pk=response.json()["id"])
    assert set(group.user_set.all()) == {user, other}


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "x", "members": ["00000000-0000-0000-0000-000000000000"]}],
)
def test_create_group_invalid_is_400(body):
    response = client_for(make_user()).post("/api/groups/", body, format="json")

    assert response.status_code == 400
    assert not Group.objects.exists()


def test_create_group_duplicate_name_is_400():
    make_group(name="lab")

    response = client_for(make_user()).post("/api/groups/", {"name": "lab"}, format="json")

    assert response.status_code == 400
    assert "name" in response.json()


def test_group_list_superuser_only():
    make_group(name="b")
    make_group(name="a")

    denied = client_for(make_user()).get("/api/groups/")
    allowed = client_for(make_user(is_superuser=True)).get("/api/groups/")

    assert denied.status_code == 403
    assert "users/groups/" in denied.json()["detail"]
    assert allowed.status_code == 200
    assert [item["name"] for item in allowed.json()] == ["a", "b"]


def test_group_detail_member_reads():
    member = make_user()
    group = make_group(member)

    response = client_for(member).get(f"/api/groups/{group.pk}/")

    assert response.status_code == 200
    assert response.json() == {"id": group.pk, "name": "lab", "members": [str(member.pk)]}


def test_group_detail_non_member_is_403():
    group = make_group(make_user())

    response = client_for(make_user()).get(f"/api/groups/{group.pk}/")

    assert response.status_code == 403


def test_group_detail_missing_is_404():
    response = client_for(make_user()).get("/api/groups/999999/")

    assert response.status_code == 404


def test_group_put_renames_and_keeps_members():
    member = make_user()
    group = make_group(member)

    response = client_for(member).put(f"/api/groups/{group.pk}/", {"name": "new"}, format="json")

    assert response.status_code == 200
    group.refresh_from_db()
    assert group.name == "new"
    assert list(group.user_set.all()) == [member]


def test_group_put_without_name_is_400():
    member = make_user()
    group = make_group(member)

    response = client_for(member).put(f"/api/groups/{group.pk}/", {}, format="json")

    assert response.status_code == 400
    group.refresh_from_db()
    assert group.name == "lab"


def test_group_patch_replaces_members():
    member = make_user()
    newcomer = make_user()
    group = make_group(member)

    response = client_for(member).patch(
        f"/api/groups/{group.pk}/", {"members": [str(member.pk), str(newcomer.pk)]}, format="json"
    )

    assert response.status_code == 200
    assert set(group.user_set.all()) == {member, newcomer}
    group.refresh_from_db()
    assert group.name == "lab"


def test_group_patch_non_member_is_403():
    group = make_group(make_user())

    response = client_for(make_user()).patch(
        f"/api/groups/{group.pk}/", {"name": "taken"}, format="json"
    )

    assert response.status_code == 403
    group.refresh_from_db()
    assert group.name == "lab"


def test_group_delete_by_member():
    member = make_user()
    group = make_group(member)

    response = client_for(member).delete(f"/api/groups/{group.pk}/")

    assert response.status_code == 204
    assert not Group.objects.filter(pk=group.pk).exists()


def test_group_delete_by_superuser():
    group = make_group(make_user())

    response = client_for(make_user(is_superuser=True)).delete(f"/api/groups/{group.pk}/")

    assert response.status_code == 204
