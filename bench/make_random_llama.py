"""Write a random-init fp32 LlamaForCausalLM as a Hugging Face directory, one layer at a time.

The benchmark model (defaults) is hidden 1024, intermediate 2816, 2 layers, 16 heads of 64, vocab 512, with the
tokenizer of the bundled stories260K model so both engines tokenize the calibration text identically.

The init is the one transformers' `LlamaPreTrainedModel._init_weights` uses (Linear and Embedding weights
~ N(0, initializer_range), RMSNorm weights = 1), drawn from one seeded generator in a fixed tensor order, so the
same arguments give the same bytes. Tensors are generated and written per decoder layer, so making a model far
larger than RAM only costs one layer of memory (for the memory tests).

    python3 bench/make_random_llama.py OUT_DIR [--layers 2 --hidden 1024 --intermediate 2816]
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
# The in-repo copy (tests/fixtures) lets a fresh clone run the benchmark; ../shared is the fallback.
TOKENIZER_DIRS = [REPO / "tests/fixtures/models/stories260K", REPO.parent / "shared/models/stories260K",
                  Path("/work/shared/models/stories260K")]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
VOCAB = 512  # the stories260K tokenizer
SHARD_BYTES = 2 * 1024**3  # one file up to this size; above it, one shard per decoder layer


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    """The config.json fields; transformers fills in the rest with its defaults."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        # Untied, so that lm_head is a Linear of its own and a recipe that wrongly prunes it shows up.
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
        "use_cache": True,
    }


def layer_shapes(cfg: dict, i: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of decoder layer i's tensors, in generation order."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (q, h)),
        (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)),
        (p + "self_attn.o_proj.weight", (h, q)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "mlp.gate_proj.weight", (f, h)),
        (p + "mlp.up_proj.weight", (f, h)),
        (p + "mlp.down_proj.weight", (h, f)),
    ]


def make_tensors(shapes: list[tuple[str, tuple[int, ...]]], std: float, gen: torch.Generator) -> dict:
    """Norm weights (1-D) are ones; every matrix is N(0, std) in fp32."""
    out = {}
    for name, shape in shapes:
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=torch.float32)
        else:
            out[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    return out


def write_model(out_dir: Path, layers: int = 2, hidden: int = 1024, intermediate: int = 2816,
                heads: int | None = None, kv_heads: int | None = None, seed: int = 0) -> Path:
    heads = heads or max(1, hidden // 64)
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden}, heads {heads}, kv_heads {kv_heads} do not divide")
    cfg = llama_config(layers, hidden, intermediate, heads, kv_heads)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    std = cfg["initializer_range"]

    head = [("model.embed_tokens.weight", (VOCAB, hidden))]
    tail = [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    groups = [head] + [layer_shapes(cfg, i) for i in range(layers)] + [tail]
    total = 4 * sum(torch.Size(s).numel() for g in groups for _, s in g)
    meta = {"format": "pt"}

    if total <= SHARD_BYTES:
        tensors = {}
        for g in groups:
            tensors.update(make_tensors(g, std, gen))
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=meta)
    else:
        # embeddings + first layer share a shard, the last layer + norm + lm_head another: n = layers shards
        shards = [groups[0] + groups[1]] + groups[2:-2] + [groups[-2] + groups[-1]] if layers > 1 else [sum(groups, [])]
        weight_map = {}
        for k, g in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(make_tensors(g, std, gen), str(out_dir / fname), metadata=meta)
            weight_map.update({name: fname for name, _ in g})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    tok_dir = next((d for d in TOKENIZER_DIRS if (d / "tokenizer.json").exists()), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no stories260K tokenizer in {TOKENIZER_DIRS}")
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copyfile(tok_dir / name, out_dir / name)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=None, help="default: hidden // 64 (head_dim 64)")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = write_model(a.out_dir, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.seed)
    print(out)


if __name__ == "__main__":
    main()
