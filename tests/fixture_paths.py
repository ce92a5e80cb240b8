"""Where the tests' data lie: the bundled copies of the shared model and texts (tests/fixtures, see SOURCE.md)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
STORIES = FIXTURES / "models" / "stories260K"  # the real pretrained model
WIKI_VALID = FIXTURES / "data" / "wikitext-2" / "valid.txt"  # calibration text
WIKI_TEST = FIXTURES / "data" / "wikitext-2" / "test.txt"  # evaluation text
TINYSTORIES = FIXTURES / "data" / "tinystories" / "valid-subset.txt"  # stories260K's own domain
RECIPES = REPO / "service" / "recipes"  # the bundled recipes
