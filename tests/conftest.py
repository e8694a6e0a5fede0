from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def model_store(settings, tmp_path: Path) -> Path:
    """Point the model store at a fresh folder and return it."""
    folder = tmp_path / "models"
    folder.mkdir()
    settings.STORAGES = {
        **settings.STORAGES,
        "models": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder)},
        },
    }
    return folder


@pytest.fixture(autouse=True)
def _no_leftover_task_runner():
    """Stop the in-process task runner after each test.

    A test that enqueues work outside eager mode starts the process-wide runner. Without this
    fixture, its periodic sweep would keep running on its own thread during later tests.
    """
    yield
    from fedserve.tasks import stop_in_process_runner

    stop_in_process_runner()
