"""The migrations match the models, so a deployment's `migrate` creates every column."""

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_models_have_no_unmigrated_changes():
    output = io.StringIO()

    call_command("makemigrations", "--check", "--dry-run", stdout=output)

    assert "No changes detected" in output.getvalue()
