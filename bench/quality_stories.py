"""Perplexity of stories260K after each pruning method, both pipelines, next to llm-compressor's figures.

Calibration and evaluation exactly as shared/README.md: 128 x 256 tokens from the start of WikiText-2 valid;
perplexity over non-overlapping 512-token windows of the first 40,960 tokens of WikiText-2 test and of all of
the TinyStories subset.

    python3 bench/quality_stories.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from service.engine.oneshot import oneshot  # noqa: E402
from service.recipes import pruning_modifiers as pm  # noqa: E402
from stories_protocol import stories_protocol  # noqa: E402

REFERENCE = {  # llm-compressor 0.14 / shared/README.md
    "SparseGPT 2:4": (291.7, 42.43), "SparseGPT 50%": (291.7, 24.44),
    "magnitude 2:4": (681.3, 127.5), "magnitude 50%": (490.2, 47.86),
}
CASES = [
    ("SparseGPT 2:4", lambda: pm.SparseGPTModifier(mask_structure="2:4")),
    ("SparseGPT 50%", lambda: pm.SparseGPTModifier(sparsity=0.5)),
    ("Wanda 2:4", lambda: pm.WandaPruningModifier(mask_structure="2:4")),
    ("Wanda 50%", lambda: pm.WandaPruningModifier(sparsity=0.5)),
    ("magnitude 2:4", lambda: pm.MagnitudePruningModifier(mask_structure="2:4")),
    ("magnitude 50%", lambda: pm.MagnitudePruningModifier(sparsity=0.5)),
    ("SparseGPT 70% uniform", lambda: pm.SparseGPTModifier(sparsity=0.7)),
    ("SparseGPT 70% OWL", lambda: pm.SparseGPTModifier(sparsity=0.7, sparsity_profile="owl")),
]


def main() -> int:
    protocol = stories_protocol()
    dense, batches = protocol.dense, protocol.batches
    wiki, tiny = protocol.perplexities(dense)
    print(f"{'method':<24} {'pipeline':<9} {'WikiText-2':>11} {'TinyStories':>12} {'layer loss':>11}   llm-compressor")
    print(f"{'dense':<24} {'':<9} {wiki:>11.3f} {tiny:>12.4f}")
    for name, make in CASES:
        for pipeline in ("two_pass", "one_pass"):
            model = copy.deepcopy(dense)
            report = oneshot(model, [make()], batches=batches, device="cpu", pipeline=pipeline)
            wiki, tiny = protocol.perplexities(model)
            loss = report["totals"]["loss"]
            ref = REFERENCE.get(name)
            ref_text = f"{ref[0]:.1f} / {ref[1]:.2f}" if ref else ""
            print(f"{name:<24} {pipeline:<9} {wiki:>11.3f} {tiny:>12.4f} {loss or 0:>11.4g}   {ref_text}", flush=True)
            if "magnitude" in name:
                break  # data-free: the pipeline makes no difference
    return 0


if __name__ == "__main__":
    sys.exit(main())
