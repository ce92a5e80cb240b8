"""Tiny random-init models of each architecture family, written as Hugging Face directories for tests.

They use the bundled stories260K tokenizer (vocab 512) so the engine's own data path (text -> tokens) runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.fixture_paths import RECIPES, STORIES

# The bundled SparseGPT 2:4 recipe (llm-compressor YAML; targets Linear, ignores lm_head).
RECIPE_2OF4 = (RECIPES / "sparsegpt_2of4.yaml").read_text()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def tiny_config(arch: str):
    import transformers as t

    common = dict(vocab_size=512)
    if arch == "llama":
        return t.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "mistral":
        return t.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, sliding_window=16, **common)
    if arch == "qwen2":
        return t.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return t.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if arch == "gpt_neox":
        return t.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, **common)
    if arch == "bert":
        return t.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, **common)
    raise ValueError(arch)


ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox", "bert")


def make_model(arch: str, seed: int = 0):
    import transformers as t

    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = t.BertForMaskedLM(config) if arch == "bert" else t.AutoModelForCausalLM.from_config(config)
    return model.eval()


def write_model(arch: str, directory: Path, seed: int = 0, **save_kwargs) -> Path:
    model = make_model(arch, seed)
    model.save_pretrained(str(directory), **save_kwargs)
    for name in TOKENIZER_FILES:
        shutil.copy(STORIES / name, directory / name)
    return directory
