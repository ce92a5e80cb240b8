"""Calibration samples: fixed-length token windows cut from a text source."""

from __future__ import annotations

from pathlib import Path

import torch

from service.engine.options import SAMPLING
from service.engine.text_data import read_texts, tokenize


def calibration_tokens(
    source: str | Path,
    tokenizer,
    num_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    sampling: str = "head",
    text_field: str = "text",
) -> torch.Tensor:
    """Calibration batch of shape [num_samples, seq_len], int64 token ids.

    The source's token stream (``service.engine.text_data``: texts joined, no BOS) is cut into non-overlapping windows
    of seq_len tokens; a final partial window is never used.

    - ``sampling="head"``: the first num_samples windows, i.e. the first num_samples * seq_len tokens; only that
      much of the source is read and tokenized. The reference figures were calibrated this way (128 x 256 tokens
      from the start of wikitext-2/valid.txt).
    - ``sampling="random"``: num_samples distinct windows drawn from all full windows of the whole source by a
      ``torch.Generator`` seeded with ``seed`` (the same seed gives the same batch), in the drawn order.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")

    needed = num_samples * seq_len
    # "random" draws from every window of the source, so it has to tokenize all of it.
    max_tokens = needed if sampling == "head" else None
    ids = tokenize(tokenizer, read_texts(source, text_field=text_field), max_tokens=max_tokens)
    if len(ids) < needed:
        raise ValueError(
            f"not enough text in {source}: {num_samples} samples x {seq_len} tokens need {needed} tokens, "
            f"the source has {len(ids)}"
        )
    num_windows = len(ids) // seq_len
    windows = ids[: num_windows * seq_len].view(num_windows, seq_len)
    if sampling == "head":
        return windows[:num_samples].clone()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_windows, generator=generator)[:num_samples]
    return windows[chosen]
