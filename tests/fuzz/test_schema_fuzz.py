"""Property-based fuzzing of every API operation against the server's own OpenAPI schema.

Schemathesis generates valid and invalid requests from /api/schema/ of a live server on
127.0.0.1. Each response must not be a 5xx, and its status code, content type and body must
be the ones the schema documents for the operation.
The caller owns a model and a training and takes part in that training itself, and path
ids are mostly replaced by those real ids, so that requests reach the handlers' checks
instead of stopping at 404.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
import torch
from django.contrib.auth.models import Group
from django.core.files.base import ContentFile
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fedserve import modelstore
from fedserve.core.models import Model, Training, TrainingState, User
from fedserve.notify import feed, webhook
from tests.factories import make_global_model, make_training, make_user, torchscript_bytes

pytestmark = [pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
POSITIVE_EXAMPLES = 20
NEGATIVE_EXAMPLES = 10
# Every fourth generated id is kept as generated, so unknown ids are fuzzed too.
KEEP_GENERATED_ID_EVERY = 4


@dataclass
class FuzzWorld:
    """Records the fuzzing user works on. `refresh` recreates those a request deleted."""

    base_url: str
    headers: dict[str, str]
    user_id: uuid.UUID
    model_id: uuid.UUID
    training_id: uuid.UUID
    group_id: int

    def refresh(self) -> None:
        user = User.objects.get(pk=self.user_id)
        model = Model.objects.filter(pk=self.model_id).first()
        if model is None:
            model = _model_with_preprocessing(user)
            self.model_id = model.pk
        if not Training.objects.filter(pk=self.training_id).exists():
            model = Model.objects.get(pk=self.model_id)
            self.training_id = _ongoing_training(user, model).pk
        if not Group.objects.filter(pk=self.group_id).exists():
            group = Group.objects.create(name=f"fuzz-{uuid.uuid4().hex[:8]}")
            user.groups.add(group)
            self.group_id = group.pk

    def use_real_ids(self, body: dict[str, Any]) -> None:
        """Put real ids into the id fields of a generated body, except for some examples."""
        if _keeps_generated(body.get("model_id")):
            return
        if "model_id" in body:
            body["model_id"] = str(self.model_id)
        if isinstance(body.get("clients"), list):
            body["clients"] = [str(self.user_id)]
        if isinstance(body.get("models"), list):
            body["models"] = [str(self.model_id)]

    def real_id(self, path: str, generated: Any) -> Any:
        """Return the real id that fits `path`, or the generated one for some examples."""
        if _keeps_generated(generated):
            return generated
        if path.startswith("/api/models/"):
            return str(self.model_id)
        if path.startswith("/api/trainings/"):
            return str(self.training_id)
        if path.startswith("/api/users/"):
            return str(self.user_id)
        if path.startswith("/api/groups/"):
            return self.group_id
        return generated


def _keeps_generated(value: Any) -> bool:
    """Pick about one generated id in KEEP_GENERATED_ID_EVERY, the same one on every run."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, repr(value)).int
    return digest % KEEP_GENERATED_ID_EVERY == 0


def _model_with_preprocessing(owner: User) -> Model:
    model = make_global_model(owner)
    model.preprocessing_path = modelstore.save(
        modelstore.model_file_path(model.pk, "preprocessing.pt"),
        ContentFile(torchscript_bytes(torch.nn.Identity())),
    )
    model.preprocessing_format = "torchscript"
    model.save()
    return model


def _ongoing_training(user, model) -> Training:
    """A training of `model` in its first update round, with `user` as actor and participant."""
    return make_training(user, [user], model=model, state=TrainingState.ONGOING)


@pytest.fixture
def fuzz_world(live_server, transactional_db, model_store, monkeypatch) -> FuzzWorld:
    # The fuzzing user has no message endpoint, but users the fuzzer registers have generated
    # ones. Delivery is replaced so that no generated endpoint is ever contacted.
    def skip_delivery(endpoint: str, payload: dict[str, Any], **_: Any) -> webhook.Attempt:
        return webhook.Attempt(webhook.Outcome.FAILED, None, "delivery is off for fuzzing", 0.0)

    monkeypatch.setattr(webhook, "post_notification", skip_delivery)
    # Long polling would make each generated `wait` a real wait.
    monkeypatch.setattr(feed, "MAX_WAIT_SECONDS", 0.1)

    user = make_user()
    model = _model_with_preprocessing(user)
    training = _ongoing_training(user, model)
    group = Group.objects.create(name="fuzz")
    user.groups.add(group)
    address = urlsplit(live_server.url)
    assert address.hostname in ("localhost", "127.0.0.1")
    return FuzzWorld(
        base_url=f"http://127.0.0.1:{address.port}",
        headers={"Authorization": f"Token {Token.objects.get(user=user).key}"},
        user_id=user.pk,
        model_id=model.pk,
        training_id=training.pk,
        group_id=group.pk,
    )


def _documented_operations() -> dict[tuple[str, str], bool]:
    """Map (method, path) of every operation in the generated schema to whether it has inputs.

    Parametrization needs the list at collection time, before the live server runs, so it
    comes from the same generator that serves /api/schema/, and a test compares the two.
    An operation without parameters or body gives negative fuzzing nothing to break.
    """
    document = SchemaGenerator().get_schema(request=None, public=True)
    return {
        (method.upper(), path): bool(operation.get("parameters") or operation.get("requestBody"))
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    }


OPERATIONS = _documented_operations()
CASES = [
    pytest.param(method, path, GenerationMode.POSITIVE, POSITIVE_EXAMPLES, id=f"{method} {path}")
    for method, path in OPERATIONS
] + [
    pytest.param(
        method, path, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, id=f"{method} {path} invalid"
    )
    for (method, path), has_inputs in OPERATIONS.items()
    if has_inputs
]


# Loaded schemas by URL. The live server lives for the whole session and serves the same
# schema to every test, so it is fetched and parsed once.
_loaded_schemas: dict[str, Any] = {}


@pytest.fixture
def live_schema(fuzz_world):
    """The schema as the live server serves it, loaded by schemathesis."""
    url = f"{fuzz_world.base_url}/api/schema/?format=json"
    if url not in _loaded_schemas:
        _loaded_schemas[url] = schemathesis.openapi.from_url(url, timeout=30)
    return _loaded_schemas[url]


def test_live_schema_has_every_operation(live_schema):
    served = [
        (operation.method.upper(), operation.path)
        for result in live_schema.get_all_operations()
        for operation in [result.ok()]
    ]
    assert sorted(served) == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode", "examples"), CASES)
def test_operation_conforms(live_schema, fuzz_world, method, path, mode, examples):
    operation = live_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        fuzz_world.refresh()
        if case.path_parameters and "id" in case.path_parameters:
            case.path_parameters["id"] = fuzz_world.real_id(path, case.path_parameters["id"])
        if isinstance(case.body, dict):
            fuzz_world.use_real_ids(case.body)
        response = case.call_and_validate(
            base_url=fuzz_world.base_url, headers=fuzz_world.headers, checks=CHECKS, timeout=60
        )
        statuses.append(response.status_code)

    statuses: list[int] = []
    check()

    # Authentication must hold for every request, and some must get past the id lookup.
    assert 401 not in statuses
    assert set(statuses) - {404}, f"every request to {method} {path} was answered 404"
