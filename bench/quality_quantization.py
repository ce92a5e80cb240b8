"""Perplexity of stories260K after RTN and GPTQ quantization (and SparseGPT 2:4 + GPTQ), next to llm-compressor.

Protocol as bench/quality_stories.py and tests/engine/test_quality_stories.py: calibration 128 x 256 tokens from the
start of WikiText-2 valid; perplexity over non-overlapping 512-token windows of the first 40,960 tokens of
WikiText-2 test and of all of the TinyStories subset. Activation schemes (A8) are evaluated with dynamic
per-token fake quantization hooks on the quantized Linears' inputs.

    python3 bench/quality_quantization.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from service.engine.oneshot import oneshot  # noqa: E402
from service.recipes import pruning_modifiers as pm  # noqa: E402
from service.recipes import quantization_modifiers as qm  # noqa: E402
from stories_protocol import stories_protocol  # noqa: E402



def weights(bits, strategy="channel", group_size=None, symmetric=True):
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "group_size": group_size}


def groups(w, a=None):
    body = {"targets": ["Linear"], "weights": w}
    if a:
        body["input_activations"] = {"num_bits": a, "type": "int", "symmetric": True, "strategy": "token",
                                     "dynamic": True}
    return {"group_0": body}


W4 = groups(weights(4))
# 64-input Linears in groups of 32; down_proj (172 inputs) per channel.
W4_G32 = {
    "group_0": {"targets": ["re:.*(q|k|v|o|gate|up)_proj$"], "weights": weights(4, "group", 32)},
    "group_1": {"targets": ["re:.*down_proj$"], "weights": weights(4)},
}
REFERENCE = {"RTN W4 channel": (243.4, 6.368)}  # llm-compressor QuantizationModifier on stories260K
SPARSE = lambda: pm.SparseGPTModifier(mask_structure="2:4")  # noqa: E731
CASES = [
    ("RTN W4 channel", lambda: [qm.QuantizationModifier(config_groups=W4)]),
    ("GPTQ W4 channel", lambda: [qm.GPTQModifier(config_groups=W4)]),
    ("GPTQ W4 channel actorder", lambda: [qm.GPTQModifier(config_groups=W4, actorder="static")]),
    ("RTN W4 asym channel", lambda: [qm.QuantizationModifier(config_groups=groups(weights(4, symmetric=False)))]),
    ("GPTQ W4 asym channel", lambda: [qm.GPTQModifier(config_groups=groups(weights(4, symmetric=False)))]),
    ("RTN W4 g32", lambda: [qm.QuantizationModifier(config_groups=W4_G32)]),
    ("GPTQ W4 g32", lambda: [qm.GPTQModifier(config_groups=W4_G32)]),
    ("RTN W8 channel", lambda: [qm.QuantizationModifier(config_groups=groups(weights(8)))]),
    ("RTN W8A8", lambda: [qm.QuantizationModifier(config_groups=groups(weights(8), 8))]),
    ("GPTQ W4A8 channel", lambda: [qm.GPTQModifier(config_groups=groups(weights(4), 8))]),
    ("SparseGPT 2:4", lambda: [SPARSE()]),
    ("SparseGPT 2:4 + RTN W4", lambda: "stages", ),
    ("SparseGPT 2:4 + GPTQ W4", lambda: "stages"),
]


def two_stages(second: str) -> str:
    return f"""
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
quantization_stage:
  quantization_modifiers:
    {second}:
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {{num_bits: 4, type: int, symmetric: true, strategy: channel}}
"""


def two_of_four_kept(model) -> bool:
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            w = m.weight.detach()
            if not ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all():
                return False
    return True


def main() -> int:
    protocol = stories_protocol()
    dense, batches = protocol.dense, protocol.batches
    wiki, tiny = protocol.perplexities(dense)
    print(f"{'method':<28} {'WikiText-2':>11} {'TinyStories':>12} {'GPTQ loss':>10} {'seconds':>8}   note")
    print(f"{'dense':<28} {wiki:>11.3f} {tiny:>12.4f}")
    for name, make in CASES:
        model = copy.deepcopy(dense)
        recipe = make()
        if recipe == "stages":
            recipe = two_stages("GPTQModifier" if "GPTQ" in name else "QuantizationModifier")
        start = time.perf_counter()
        report = oneshot(model, recipe, batches=batches, device="cpu")
        seconds = time.perf_counter() - start
        hooks = qm.attach_scheme_activation_quantization(model)
        wiki, tiny = protocol.perplexities(model)
        for h in hooks:
            h.remove()
        loss = report["totals"]["loss"]
        notes = []
        if name in REFERENCE:
            notes.append("llm-compressor %.1f / %.3f" % REFERENCE[name])
        if name.startswith("SparseGPT"):
            notes.append("2:4 kept" if two_of_four_kept(model) else "2:4 BROKEN")
        loss_text = f"{loss:>10.4g}" if loss is not None and "GPTQ" in name else f"{'':>10}"
        print(f"{name:<28} {wiki:>11.3f} {tiny:>12.4f} {loss_text} {seconds:>8.1f}   {'; '.join(notes)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
