import pytest

from tests.factories import client_for, make_global_model, make_user


@pytest.mark.django_db
def test_schema_served_without_login():
    response = client_for(None).get("/api/schema/")
    assert response.status_code == 200


@pytest.mark.django_db
def test_model_factory_stores_file(model_store):
    owner = make_user()
    model = make_global_model(owner)
    assert (model_store / model.weights_path).stat().st_size == model.weights_size
