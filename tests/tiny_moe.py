"""Tiny random-init mixture-of-experts models (Mixtral, Qwen3-MoE, DeepSeek-V3), written as Hugging Face directories.

Built from transformers' own config and model classes; ``save_pretrained`` writes each expert as its own Linear, the
layout of the Hub checkpoints (transformers fuses them into 3-D tensors only when it loads). They use the bundled
stories260K tokenizer (vocab 512), so the engine's own data path (text -> tokens) runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.tiny_models import TOKENIZER_FILES
from tests.fixture_paths import STORIES

MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


def tiny_moe_config(family: str):
    import transformers as t

    common = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(num_hidden_layers=2, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                                head_dim=16, norm_topk_prob=True, **common)
    if family == "mixtral":
        return t.MixtralConfig(num_hidden_layers=2, num_local_experts=4, intermediate_size=48, **common)
    if family == "deepseek_v3":
        # Layer 0 dense (first_k_dense_replace), layers 1-2 routed experts plus one shared expert; MLA attention.
        return t.DeepseekV3Config(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                                  n_group=2, topk_group=1, moe_intermediate_size=32, intermediate_size=96,
                                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, routed_scaling_factor=1.0, **common)
    raise ValueError(f"unknown MoE family {family!r}; known: {MOE_FAMILIES}")


def make_moe_model(family: str, seed: int = 0, starve: tuple[int, int] | None = None):
    """``starve=(layer, expert)``: DeepSeek-V3 only, that expert's routing bias so low its router never picks it."""
    import transformers as t

    config = tiny_moe_config(family)
    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(config).eval()
    # transformers initialises routers to zero or tiny values; random routers make routing (and so the test) real.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
            if name.endswith("e_score_correction_bias"):
                param.uniform_(-0.1, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.1, 0.1)
        if starve is not None:
            layer, expert = starve
            model.model.layers[layer].mlp.gate.e_score_correction_bias[expert] = -100.0
    return model


def write_moe_model(family: str, directory: Path, seed: int = 0, starve: tuple[int, int] | None = None) -> Path:
    model = make_moe_model(family, seed, starve)
    model.save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        shutil.copy(STORIES / name, directory / name)
    return directory
