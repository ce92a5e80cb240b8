"""Reference tokenizations the text and calibration tests compare against."""

from __future__ import annotations

import torch

from tests.fixture_paths import TINYSTORIES


def whole_text_ids(tok, text: str) -> torch.Tensor:
    """The whole text tokenized in one call, no special tokens: what piecewise tokenization must equal."""
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def stories_lines() -> list[str]:
    return TINYSTORIES.read_text(encoding="utf-8").splitlines(keepends=True)
