"""A quantization recipe through the streaming compress_checkpoint: the output is a compressed-tensors
checkpoint that transformers loads back to exactly the weights the in-memory oneshot computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.calibration_data import calibration_tokens
from service.oneshot import EvalSet, compress_checkpoint, oneshot, token_batches
from service.text_data import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
STORIES = FIXTURES / "models" / "stories260K"
CALIB = FIXTURES / "data" / "wikitext-2" / "valid.txt"
TINY = FIXTURES / "data" / "tinystories" / "valid-subset.txt"

SPARSE_THEN_GPTQ = """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier: {sparsity: 0.5, mask_structure: "2:4", targets: [Linear], ignore: ["re:.*lm_head"]}
quantization_stage:
  quantization_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 4}
"""


def load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def test_streamed_sparse_gptq_checkpoint_reloads_to_the_in_memory_result(tmp_path):
    report = compress_checkpoint(STORIES, SPARSE_THEN_GPTQ, tmp_path / "out", dataset=CALIB, num_samples=16,
                                 seq_len=64, evals=[EvalSet("tiny", TINY, 4096)], device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert list(quant["config_groups"].values())[0]["targets"] == ["Linear"] and "lm_head" in quant["ignore"]
    assert 1.0 < report["perplexity"]["tiny"]["ratio"] < 20

    from service.quantized_export import load_quantized

    decompressed = load_quantized(tmp_path / "out")  # the compressed-tensors library's own decompression
    reloaded = load(tmp_path / "out")  # transformers' loader (it may keep the modules compressed)
    tokenizer = load_tokenizer(STORIES)
    tokens = calibration_tokens(CALIB, tokenizer, 16, 64)
    model = load(STORIES)
    oneshot(model, SPARSE_THEN_GPTQ, batches=token_batches(tokens), device="cpu")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(decompressed.get_submodule(name).weight, module.weight), name
    probe = tokens[:2]
    with torch.no_grad():
        assert (model(probe).logits - reloaded(probe).logits).abs().max() < 1e-4
    # Still 2:4 after GPTQ: every group of four inputs has two zeros.
    for name, module in decompressed.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            groups = module.weight.reshape(module.weight.shape[0], -1, 4)
            assert ((groups == 0).sum(-1) >= 2).all(), name


def test_quantization_in_an_early_stage_is_refused(tmp_path):
    first, second = SPARSE_THEN_GPTQ.strip().split("\nquantization_stage:")
    recipe = "quantization_stage:" + second + "\n" + first  # quantization first, then sparsity
    with pytest.raises(ValueError, match="must be in the last stage"):
        compress_checkpoint(STORIES, recipe, tmp_path / "out", dataset=CALIB, num_samples=4, seq_len=32)
    assert not (tmp_path / "out").exists()
