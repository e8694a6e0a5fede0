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
