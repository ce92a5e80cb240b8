"""The job request body the job-domain tests start from: stories260K, SparseGPT 2:4, 16 x 64 calibration tokens."""

from __future__ import annotations

from tests.fixture_paths import STORIES, WIKI_VALID
from tests.tiny_models import RECIPE_2OF4

SECRET = "whsec-do-not-leak-7f3a"  # a webhook secret no message, log or response may show


def request(output: str = "runs/x", **overrides) -> dict:
    body = {"model": str(STORIES), "recipe": RECIPE_2OF4,
            "dataset": {"source": str(WIKI_VALID), "num_samples": 16, "seq_len": 64, "seed": 0},
            "output": output}
    body.update(overrides)
    return body
