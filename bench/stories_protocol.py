"""The quality protocol of shared/README.md on stories260K, shared by the quality benchmarks.

Calibration: 128 x 256 tokens from the start of WikiText-2 valid. Perplexity: non-overlapping 512-token windows of
the first 40,960 tokens of WikiText-2 test, and of all of the TinyStories subset.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.engine.calibration_data import calibration_tokens  # noqa: E402
from service.engine.oneshot import token_batches  # noqa: E402
from service.engine.perplexity import perplexity  # noqa: E402
from service.engine.text_data import load_tokenizer, read_texts, tokenize  # noqa: E402

FIX = REPO / "tests" / "fixtures"
MODEL = FIX / "models" / "stories260K"


@dataclass
class Protocol:
    dense: torch.nn.Module  # stories260K, fp32, eval mode
    evals: list[torch.Tensor]  # token ids of WikiText-2 test (first 40,960) and of the TinyStories subset
    batches: list[dict]  # the calibration batches

    def perplexities(self, model: torch.nn.Module) -> tuple[float, float]:
        """(WikiText-2, TinyStories) perplexity of ``model``."""
        wiki, tiny = (perplexity(model, ids).ppl for ids in self.evals)
        return wiki, tiny


def stories_protocol(threads: int = 1) -> Protocol:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    tok = load_tokenizer(MODEL)
    dense = AutoModelForCausalLM.from_pretrained(str(MODEL)).eval()
    evals = [tokenize(tok, read_texts(FIX / "data/wikitext-2/test.txt"), max_tokens=40960),
             tokenize(tok, read_texts(FIX / "data/tinystories/valid-subset.txt"))]
    batches = token_batches(calibration_tokens(FIX / "data/wikitext-2/valid.txt", tok, 128, 256))
    return Protocol(dense, evals, batches)
