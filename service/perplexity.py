"""Perplexity of a causal LM over a token stream, in non-overlapping windows.

Convention (it reproduces the reference figures of the shared README for dense stories260K: WikiText-2 195.37
over the first 40,960 tokens of wikitext-2/test.txt, TinyStories 5.534 over all of valid-subset.txt):

- the text is tokenized as one string (the whole file at once, not line by line), without BOS or other special
  tokens (``service.text_data.tokenize``);
- the stream is cut into non-overlapping windows of seq_len tokens and each window is scored on its own, with
  no context carried over from the previous window: a window of n tokens predicts its last n - 1 tokens;
- a final partial window counts (if it has at least 2 tokens);
- nll is the mean negative log-likelihood (natural log) over all predicted tokens, ppl = exp(nll).

Per-line tokenization gives 5.565 and dropping the final partial window gives 5.553 on TinyStories; a BOS in
front of each window gives 203.1 on WikiText-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from service.text_data import read_texts, tokenize


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens: sum over windows of (window length - 1)
    windows: int  # windows scored, the final partial one included


def perplexity(
    model,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over ``token_ids`` (1-D int64), in the windows of the module docstring.

    ``model`` is a Hugging Face causal LM (or anything called as ``model(input_ids, use_cache=False)`` returning
    ``.logits`` of shape [batch, len, vocab]). It runs in eval mode under ``torch.inference_mode`` (its train/eval
    mode is restored afterwards) on ``device``, by default the device of its first parameter. Logits are upcast to
    fp32 for the loss one window at a time, and the loss is summed in fp64, so batch_size does not change the
    result beyond the model's own batch-dependent rounding.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(token_ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    if device is None:
        device = next(model.parameters()).device

    num_full = len(token_ids) // seq_len
    full = token_ids[: num_full * seq_len].view(num_full, seq_len)
    tail = token_ids[num_full * seq_len :]
    # Full windows go in batches; the partial one alone, so no padding or attention mask is needed.
    batches = [full[i : i + batch_size] for i in range(0, num_full, batch_size)]
    if len(tail) >= 2:
        batches.append(tail[None])

    total_nll = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per window
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = batch.to(device=device, dtype=torch.long)
                logits = model(batch, use_cache=False).logits
                for row_logits, row in zip(logits, batch):
                    loss = F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum")
                    total_nll += loss.double()
                    total_tokens += len(row) - 1
    finally:
        model.train(was_training)

    nll = total_nll.item() / total_tokens
    windows = num_full + (1 if len(tail) >= 2 else 0)
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=total_tokens, windows=windows)


def perplexity_of_text(
    model,
    tokenizer,
    source: str | Path,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    text_field: str = "text",
) -> PerplexityResult:
    """Perplexity over the first ``max_tokens`` tokens (all when None) of a text source (``service.text_data``).

    The reference WikiText-2 figure is ``perplexity_of_text(model, tok, "wikitext-2/test.txt", max_tokens=40960)``,
    the TinyStories one ``perplexity_of_text(model, tok, "tinystories/valid-subset.txt")``, both with seq_len 512.
    """
    ids = tokenize(tokenizer, read_texts(source, text_field=text_field), max_tokens=max_tokens)
    return perplexity(model, ids, seq_len=seq_len, batch_size=batch_size, device=device)
