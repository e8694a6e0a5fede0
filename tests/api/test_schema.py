"""Schema pages: served without login, assets from this server, documented status codes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from drf_spectacular.validation import validate_schema

from tests.factories import client_for

pytestmark = pytest.mark.django_db

DOC_PAGES = ["/api/schema/swagger-ui/", "/api/schema/redoc/"]

# Status codes each operation of the users, groups and trainings endpoints documents.
DOCUMENTED = {
    ("/api/users/", "get"): {200, 401},
    ("/api/users/", "post"): {201, 400, 401, 403},
    ("/api/users/myself/", "get"): {200, 401},
    ("/api/users/{id}/", "get"): {200, 401, 404},
    ("/api/users/groups/", "get"): {200, 401},
    ("/api/users/trainings/", "get"): {200, 401},
    ("/api/groups/", "get"): {200, 401, 403},
    ("/api/groups/", "post"): {201, 400, 401},
    ("/api/groups/{id}/", "get"): {200, 401, 403, 404},
    ("/api/groups/{id}/", "put"): {200, 400, 401, 403, 404},
    ("/api/groups/{id}/", "patch"): {200, 400, 401, 403, 404},
    ("/api/groups/{id}/", "delete"): {204, 401, 403, 404},
    ("/api/trainings/", "get"): {200, 401},
    ("/api/trainings/", "post"): {201, 400, 401, 403, 404},
    ("/api/trainings/{id}/", "get"): {200, 401, 403, 404},
    ("/api/trainings/{id}/", "delete"): {200, 401, 403, 404},
    ("/api/trainings/{id}/clients/", "put"): {202, 400, 401, 403, 404, 409},
    ("/api/trainings/{id}/clients/", "delete"): {200, 400, 401, 403, 404},
    ("/api/trainings/{id}/start/", "post"): {202, 400, 401, 403, 404},
}


def fetch_schema() -> dict:
    response = client_for(None).get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def asset_urls(html: str) -> list[str]:
    return re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]+)"', html)


def test_schema_valid_openapi():
    schema = fetch_schema()

    assert schema["openapi"].startswith("3.")
    validate_schema(schema)


def test_schema_documents_status_codes():
    paths = fetch_schema()["paths"]

    for (path, method), codes in DOCUMENTED.items():
        documented = {int(code) for code in paths[path][method]["responses"]}
        assert documented == codes, f"{method.upper()} {path}"


def test_schema_documents_request_bodies():
    paths = fetch_schema()["paths"]

    create = paths["/api/trainings/"]["post"]["requestBody"]["content"]["application/json"]
    clients = paths["/api/trainings/{id}/clients/"]["put"]["requestBody"]
    register = paths["/api/users/"]["post"]
    assert create["schema"]["$ref"].endswith("/TrainingCreateRequest")
    assert "application/json" in clients["content"]
    assert "requestBody" in register
    assert register.get("security", [{}]) == [{}]


def test_schema_hides_passwords_in_responses():
    schemas = fetch_schema()["components"]["schemas"]

    assert "password" not in schemas["User"]["properties"]
    assert "password" in schemas["UserRequest"]["properties"]


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_page_loads_local_assets(page):
    client = client_for(None)

    response = client.get(page)

    assert response.status_code == 200
    html = response.content.decode()
    urls = asset_urls(html)
    assert urls, "the page loads no scripts or styles"
    for url in urls:
        parts = urlsplit(url)
        assert parts.netloc in ("", "127.0.0.1"), url
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_page_names_no_other_host(page):
    html = client_for(None).get(page).content.decode()

    hosts = {urlsplit(url).netloc for url in re.findall(r"https?://[^\s\"'<>]+", html)}
    assert hosts <= {"127.0.0.1", "localhost", "testserver"}


def test_swagger_ui_disables_online_validator():
    html = client_for(None).get("/api/schema/swagger-ui/").content.decode()

    assert '"validatorUrl": null' in html


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_served_doc_assets_under_gunicorn(tmp_path: Path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "FEDSERVE_DATA_DIR": str(tmp_path),
        "FEDSERVE_THREADS": "4",
        "DJANGO_SETTINGS_MODULE": "fedserve.settings",
    }
    env.pop("DATABASE_URL", None)
    command = [
        sys.executable,
        "-m",
        "fedserve",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/api/schema/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, "fedserve serve exited early"
            assert time.monotonic() < deadline, "fedserve serve did not start within 60 s"
            time.sleep(0.2)

        for page in DOC_PAGES:
            html = requests.get(base + page, timeout=10)
            assert html.status_code == 200
            for url in asset_urls(html.text):
                asset = requests.get(base + url, timeout=10)
                assert asset.status_code == 200, url
                assert len(asset.content) > 0, url
    finally:
        server.terminate()
        server.wait(timeout=20)
