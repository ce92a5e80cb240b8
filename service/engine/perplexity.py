"""Perplexity of a causal LM over a token stream, in non-overlapping windows.

Convention (it reproduces the reference figures of the shared README for dense stories260K: WikiText-2 195.37
over the first 40,960 tokens of wikitext-2/test.txt, TinyStories 5.534 over all of valid-subset.txt):

- the text is tokenized as one string (the whole file at once, not line by line), without BOS or other special
  tokens (``service.engine.text_data.tokenize``);
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

from service.engine.text_data import read_texts, tokenize


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens: sum over windows of (window length - 1)
    windows: int  # windows scored, the final partial one included


def _check(token_ids: torch.Tensor, seq_len: int, batch_size: int) -> None:
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(token_ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")


def _window_batches(token_ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Full windows in batches of batch_size; the partial last one alone, so no padding or attention mask."""
    num_full = len(token_ids) // seq_len
    full = token_ids[: num_full * seq_len].view(num_full, seq_len)
    tail = token_ids[num_full * seq_len :]
    batches = [full[i : i + batch_size] for i in range(0, num_full, batch_size)]
    if len(tail) >= 2:
        batches.append(tail[None])
    return batches


class _Tally:
    """Summed NLL (fp64) and predicted-token count over scored windows."""

    def __init__(self):
        self.nll = 0.0
        self.tokens = 0
        self.windows = 0

    def add(self, logits: torch.Tensor, batch: torch.Tensor) -> None:
        for row_logits, row in zip(logits, batch):  # upcast one window at a time: bounded fp32 memory
            self.nll += F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum").double().item()
            self.tokens += len(row) - 1
            self.windows += 1

    def result(self) -> PerplexityResult:
        nll = self.nll / self.tokens
        return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=self.tokens, windows=self.windows)


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
    _check(token_ids, seq_len, batch_size)
    if device is None:
        device = next(model.parameters()).device
    tally = _Tally()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in _window_batches(token_ids, seq_len, batch_size):
                batch = batch.to(device)
                tally.add(model(batch, use_cache=False).logits, batch)
    finally:
        model.train(was_training)
    return tally.result()


def perplexity_streamed(
    model_dir: str | Path,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    checkpoint=None,
) -> PerplexityResult:
    """The same perplexity for a checkpoint directory (its tensors read by ``checkpoint`` when given, e.g. ranged
    GETs on S3), streamed block by block as compression is: only one
    block's weights (plus embeddings and head) are in memory, and the windows' hidden states travel from block
    to block. Equal to ``perplexity`` on the loaded model up to float rounding.

    Our compressed outputs are scored as the model they compute: a compressed-tensors (quantized) checkpoint is
    decompressed one module at a time as its block loads, with its schemes' dynamic activation quantization, and
    online rotations recorded in config.json (R3/R4, ``service.engine.transform_export.DESCRIPTION_KEY``) are attached
    to the skeleton first.
    """
    from service.engine.model_source import StreamedModel
    from service.engine.pipeline import capture, run_block
    from service.engine.transform_export import DESCRIPTION_KEY
    from service.recipes.online_rotations import attach_online_transforms
    from service.recipes.targets import find_blocks

    _check(token_ids, seq_len, batch_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = StreamedModel(model_dir, trust_remote_code=trust_remote_code, compressed=True,
                           **({"checkpoint": checkpoint} if checkpoint is not None else {}))
    model = source.model
    online = getattr(source.config, DESCRIPTION_KEY, None)  # config.json's keys are the config's attributes
    if online:
        attach_online_transforms(model, online)
    if any(scheme.input_activations is not None for _, scheme in source.compressed.values()):
        # A8/A4/FP8/FP4 schemes quantize each Linear's input at run time, after the online rotation (hooks run in
        # order); static ones (FP8's input_scale, NVFP4's input_global_scale) read their calibrated scales, a few
        # scalars per module, once here.
        from service.engine.quantized_export import quant_args_from_ct
        from service.recipes.quantization_modifiers import attach_scheme_activation_quantization

        calibrated = {}
        for weight_name, (name, scheme) in source.compressed.items():
            if scheme.input_activations is not None and scheme.input_activations.dynamic is not True:
                key = "input_global_scale" if scheme.input_activations.strategy == "tensor_group" else "input_scale"
                calibrated[name, key] = source.keys[weight_name] + "." + key
        stored = source.checkpoint.read(list(calibrated.values())) if calibrated else {}
        for name, scheme in source.compressed.values():
            if scheme.input_activations is not None:
                module = model.get_submodule(name)
                module.input_quantization_args = quant_args_from_ct(scheme.input_activations)
                for key in ("input_scale", "input_global_scale"):
                    if (name, key) in calibrated:
                        module.register_buffer(key, stored[calibrated[name, key]].to(device))
        attach_scheme_activation_quantization(model)
    blocks = find_blocks(model)
    names = [name for name, _ in blocks]
    outside = [n for n in source.keys if not any(n.startswith(b + ".") for b in names)]
    batches = _window_batches(token_ids, seq_len, batch_size)
    source.load(outside, device)
    with torch.inference_mode():
        hidden, calls = capture(model, blocks, [{"input_ids": b} for b in batches], device)
        for i, (name, block) in enumerate(blocks):
            params = source.parameter_names(name)
            source.load(params, device)
            hidden = run_block(block, hidden, calls[i], []).outputs
            source.release(params)
        # The head: the model's own forward with every block passing its input through, except the last, which
        # hands over the streamed result for this batch; so norms, heads and scalings stay the model's own.
        final = iter(hidden)
        for _, block in blocks[:-1]:
            block.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]
        blocks[-1][1].forward = lambda *args, **kwargs: next(final)
        tally = _Tally()
        try:
            for batch in batches:
                batch = batch.to(device)
                tally.add(model(input_ids=batch, use_cache=False).logits, batch)
        finally:
            for _, block in blocks:
                del block.forward
    return tally.result()


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
    """Perplexity over the first ``max_tokens`` tokens (all when None) of a text source (``service.engine.text_data``).

    The reference WikiText-2 figure is ``perplexity_of_text(model, tok, "wikitext-2/test.txt", max_tokens=40960)``,
    the TinyStories one ``perplexity_of_text(model, tok, "tinystories/valid-subset.txt")``, both with seq_len 512.
    """
    ids = tokenize(tokenizer, read_texts(source, text_field=text_field), max_tokens=max_tokens)
    return perplexity(model, ids, seq_len=seq_len, batch_size=batch_size, device=device)
