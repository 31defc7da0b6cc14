"""Fixtures the unit tests of models share: the default settings and the models they configure."""

import pytest

from config.models import load_models
from config.settings import Settings


@pytest.fixture(scope="module")
def settings():
    return Settings.from_env({})


@pytest.fixture(scope="module")
def models(settings):
    return load_models(settings.models_file)
