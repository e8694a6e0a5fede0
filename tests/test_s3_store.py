"""The model endpoints against an S3-compatible store (moto's server on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from django.core.files.base import ContentFile
from moto.server import ThreadedMotoServer

from fedserve import modelstore
from fedserve.core.models import Model, ModelKind, RoundPhase, TrainingState
from tests.factories import (
    TinyNet,
    client_for,
    make_training,
    make_user,
    state_dict_bytes,
    torchscript_bytes,
)

pytestmark = pytest.mark.django_db

BUCKET = "fedserve-test-models"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(settings, s3_endpoint, monkeypatch):
    """Point the "models" storage at a fresh bucket; return a boto3 client for checks."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    settings.STORAGES = {
        **settings.STORAGES,
        "models": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "endpoint_url": s3_endpoint,
                "region_name": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
                "file_overwrite": True,
                "default_acl": None,
            },
        },
    }
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def object_keys(client) -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_s3_upload_download_delete(s3_store, django_capture_on_commit_callbacks):
    owner = make_user()
    content = torchscript_bytes()
    client = client_for(owner)
    assert not modelstore.is_local()

    response = client.post(
        "/api/models/",
        {
            "name": "s3",
            "description": "",
            "model_file": _file(content),
            "input_shape": ["None", "4"],
        },
        format="multipart",
    )
    assert response.status_code == 201, response.content
    model_id = response.json()["model_id"]
    assert object_keys(s3_store) == [f"models/{model_id}/weights.pt"]

    download = client.get(f"/api/models/{model_id}/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == content
    assert download["Content-Length"] == str(len(content))

    stats = client.get(f"/api/models/{model_id}/metadata/").json()["stats"]
    assert stats["output_shape"] == [1, 3]

    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"/api/models/{model_id}/").status_code == 200
    assert object_keys(s3_store) == []


def test_s3_local_update_checked_against_stored_model(s3_store, monkeypatch):
    monkeypatch.setattr("fedserve.rounds.local_model_uploaded", lambda model: None)
    actor, participant = make_user(), make_user()
    created = client_for(actor).post(
        "/api/models/",
        {"name": "s3", "description": "", "model_file": _file(torchscript_bytes())},
        format="multipart",
    )
    model = Model.objects.get(pk=created.json()["model_id"])
    make_training(
        actor, [participant], model=model, state=TrainingState.ONGOING, phase=RoundPhase.UPDATE
    )
    update = state_dict_bytes(dict(TinyNet().state_dict()))

    response = client_for(participant).post(
        f"/api/models/{model.pk}/",
        {"round": 0, "sample_size": 8, "model_file": _file(update)},
        format="multipart",
    )

    assert response.status_code == 201, response.content
    local = Model.objects.get(kind=ModelKind.LOCAL)
    assert f"models/{local.pk}/weights.pt" in object_keys(s3_store)
    assert b"".join(modelstore.iter_chunks(local.weights_path)) == update


def _file(content: bytes) -> ContentFile:
    return ContentFile(content, name="model.pt")
