"""Fixtures shared by the engine's tests."""

from __future__ import annotations

import pytest

from service.engine.text_data import load_tokenizer
from tests.fixture_paths import STORIES


@pytest.fixture(scope="module")
def tok():
    """stories260K's tokenizer (vocab 512)."""
    return load_tokenizer(STORIES)
