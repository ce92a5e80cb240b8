"""Mixture-of-experts checkpoints through the streaming engine (service.engine.moe): Qwen3-MoE, Mixtral and
DeepSeek-V3 (shared experts, a dense first layer, MLA attention), tiny and random, from transformers' own classes.

Each checkpoint stores one Linear per expert, as the Hub's do; the engine reads those keys as they are, calibrates
each expert on the tokens its router sends it, and writes the same layout, which transformers loads (fusing it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from service.engine.compress import compress_checkpoint
from service.engine.model_source import CheckpointError, SafetensorsCheckpoint, StreamedModel, empty_model
from service.engine.moe import ExpertLinears, expert_of
from service.engine.text_data import read_texts, tokenize
from tests.fixture_paths import REPO, RECIPES, STORIES, WIKI_TEST, WIKI_VALID
from tests.tiny_models import TOKENIZER_FILES
from tests.tiny_moe import MOE_FAMILIES, tiny_moe_config, write_moe_model

SPARSEGPT_50 = RECIPES / "sparsegpt_50.yaml"
MAGNITUDE_50 = """
sparsity_stage:
  sparsity_modifiers:
    MagnitudePruningModifier:
      sparsity: 0.5
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
"""
GPTQ_W4 = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
"""
CALIBRATION = {"source": str(WIKI_VALID), "num_samples": 16, "seq_len": 64}
TOP_K = 2
# DeepSeek-V3: the router of layer 1 never picks expert 7 (its routing bias is -100): it gets no calibration token.
STARVED = (1, 7)


def _experts(names) -> list[str]:
    return [n for n in names if expert_of(n) is not None]


def _router_keys(keys) -> list[str]:
    return [k for k in keys if ".gate.weight" in k or "e_score_correction_bias" in k]


def _logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """Logits of our streamed model (every tensor loaded at once: the model is tiny)."""
    source = StreamedModel(model_dir)
    source.load(list(source.keys), "cpu")
    with torch.no_grad():
        return source.model(ids).logits


def _reloaded_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def held_out(tok) -> torch.Tensor:
    return tokenize(tok, read_texts(WIKI_TEST), max_tokens=4 * 64).reshape(4, 64)


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family_run(request, tmp_path_factory):
    """(family, source directory, SparseGPT 50% output, its report, magnitude 50% output)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    src = write_moe_model(family, root / "src", starve=STARVED if family == "deepseek_v3" else None)
    report = compress_checkpoint({"model": src, "recipe": str(SPARSEGPT_50), "output": root / "sparsegpt",
                                  "dataset": CALIBRATION, "device": "cpu"})
    compress_checkpoint({"model": src, "recipe": MAGNITUDE_50, "output": root / "magnitude", "device": "cpu"})
    return family, src, root / "sparsegpt", report, root / "magnitude"


def test_unfused_skeleton_computes_what_transformers_computes(tmp_path, held_out):
    for family in MOE_FAMILIES:
        src = write_moe_model(family, tmp_path / family)
        source = StreamedModel(src)
        assert any(isinstance(m, ExpertLinears) for m in source.model.modules())
        # The checkpoint's own per-expert keys, nothing fused, nothing missing.
        assert set(source.keys.values()) == set(SafetensorsCheckpoint(src).keys())
        torch.testing.assert_close(_logits(src, held_out), _reloaded_logits(src, held_out), rtol=1e-5, atol=1e-5)


def test_sparsegpt_compresses_every_expert(family_run):
    family, src, out, report, _ = family_run
    before, after = SafetensorsCheckpoint(src), SafetensorsCheckpoint(out)
    assert set(after.keys()) == set(before.keys())  # the per-expert layout in, the same layout out
    weights = after.read([k for k in after.keys() if expert_of(k) is not None])
    layers = {k.split(".")[2] for k in weights}
    expected_layers = {"1", "2"} if family == "deepseek_v3" else {"0", "1"}  # DeepSeek-V3's layer 0 is dense
    assert layers == expected_layers
    for key, weight in weights.items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6), key
    # The routers (and DeepSeek-V3's routing bias) are untouched, bit for bit.
    routers = _router_keys(before.keys())
    assert routers and all(torch.equal(a, b) for a, b in zip(before.read(routers).values(),
                                                               after.read(routers).values()))
    # The report: every expert projection with its sparsity and token count; each MoE layer's experts saw
    # top_k tokens per calibration token in all.
    modules = report["modules"]
    experts = _experts(modules)
    assert len(experts) == len(weights)
    tokens = CALIBRATION["num_samples"] * CALIBRATION["seq_len"]
    for layer in expected_layers:
        gates = [n for n in experts if n.startswith(f"model.layers.{layer}.") and n.endswith(("gate_proj", "w1"))]
        assert sum(modules[n].get("tokens", 0) for n in gates) == TOP_K * tokens
    for name in experts:
        assert modules[name]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    if family == "deepseek_v3":
        starved = [n for n in experts if expert_of(n) == (f"model.layers.{STARVED[0]}.mlp.experts", STARVED[1])]
        assert len(starved) == 3 and all(modules[n]["fallback"] == "magnitude" for n in starved)
        assert report["moe"]["fallback"] == {n: "magnitude" for n in starved} and report["moe"]["min_tokens"] == 0
        assert all("fallback" not in modules[n] for n in experts if n not in starved)
        assert "model.layers.0.mlp.gate_proj" in modules  # the dense first layer's MLP, an ordinary target
        assert "model.layers.1.mlp.shared_experts.down_proj" in modules
    else:
        assert all("fallback" not in modules[n] and modules[n]["tokens"] > 0 for n in experts)
        assert report["moe"]["fallback"] == {} and report["moe"]["expert_modules"] == len(experts)


def test_output_reloads_with_transformers_and_beats_magnitude(family_run, held_out):
    family, src, out, _, magnitude = family_run
    ours = _logits(out, held_out)
    torch.testing.assert_close(_reloaded_logits(out, held_out), ours, rtol=1e-5, atol=1e-5)
    dense = _reloaded_logits(src, held_out)
    error = (ours - dense).square().mean().item()
    magnitude_error = (_reloaded_logits(magnitude, held_out) - dense).square().mean().item()
    assert error < magnitude_error, (family, error, magnitude_error)


def test_cli_2of4_calibrates_every_expert_on_all_tokens(tmp_path):
    """SparseGPT 2:4 from the CLI with `--moe-calibrate-all-experts` (llm-compressor's moe_calibrate_all_experts):
    every expert's statistics cover every calibration token; every expert weight is 2:4 sparse."""
    src = write_moe_model("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "service.engine.cli", "compress", "--model", str(src), "--recipe",
         str(RECIPES / "sparsegpt_2of4.yaml"),
         "--dataset", str(WIKI_VALID), "--num-samples", "8", "--seq-len", "32", "--output", str(out), "--device",
         "cpu", "--moe-calibrate-all-experts", "--report-json", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["calibration"]["moe_calibrate_all_experts"] is True
    experts = _experts(report["modules"])
    assert len(experts) == 2 * 8 * 3
    for name in experts:
        entry = report["modules"][name]
        assert entry["tokens"] == 8 * 32 and entry["sparsity"] == pytest.approx(0.5, abs=1e-6)
    checkpoint = SafetensorsCheckpoint(out)
    for key, weight in checkpoint.read([k for k in checkpoint.keys() if expert_of(k) is not None]).items():
        assert ((weight.reshape(-1, 4) == 0).sum(dim=1) >= 2).all(), key  # at least 2 zeros in every 4 inputs


def test_gptq_w4_per_expert_falls_back_to_rtn_without_tokens(tmp_path):
    """GPTQ W4 on every expert; the expert its router never picks is rounded to nearest instead."""
    src = write_moe_model("deepseek_v3", tmp_path / "src", starve=STARVED)
    report = compress_checkpoint({"model": src, "recipe": GPTQ_W4, "output": tmp_path / "out",
                                  "dataset": CALIBRATION, "device": "cpu"})
    modules = report["modules"]
    experts = _experts(modules)
    assert len(experts) == 2 * 8 * 3
    starved = [n for n in experts if expert_of(n) == (f"model.layers.{STARVED[0]}.mlp.experts", STARVED[1])]
    assert all(modules[n]["fallback"] == "rtn" and modules[n]["bits"] == 4 for n in starved)
    assert all(modules[n]["bits"] == 4 and modules[n]["tokens"] > 0 for n in experts if n not in starved)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not any(n.endswith(".gate") for n in modules)  # routers are not Linear: never targeted


def test_an_unmapped_moe_family_is_refused_before_any_work(tmp_path):
    import transformers as t

    config = t.Qwen2MoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"qwen2_moe is a mixture-of-experts model.*supported: deepseek_v3, "
                                              r"mixtral, qwen3_moe"):
        empty_model(config)
    src = tmp_path / "src"
    t.AutoModelForCausalLM.from_config(config).save_pretrained(str(src))
    for name in TOKENIZER_FILES:
        shutil.copy(STORIES / name, src / name)
    with pytest.raises(CheckpointError, match="qwen2_moe"):
        compress_checkpoint({"model": src, "recipe": MAGNITUDE_50, "output": tmp_path / "out", "device": "cpu"})
    assert not (tmp_path / "out").exists()


def test_dense_configs_are_left_alone():
    config = tiny_moe_config("qwen3_moe")
    config.mlp_only_layers = [0, 1]  # every layer a dense MLP: nothing to unfuse
    model = empty_model(config)
    assert not any(isinstance(m, ExpertLinears) for m in model.modules())


def test_one_pass_and_data_parallel(tmp_path):
    """one_pass pauses every batch at every expert (each is called on every forward, empty when unrouted); two
    workers, each with its own batches, give the very bytes of one process with the same batches."""
    from service.engine.data_parallel import LocalPool

    src = write_moe_model("qwen3_moe", tmp_path / "src")
    calibration = {**CALIBRATION, "batch_size": 8}
    one_pass = compress_checkpoint({"model": src, "recipe": str(SPARSEGPT_50), "output": tmp_path / "one_pass",
                                    "dataset": calibration, "device": "cpu", "pipeline": "one_pass"})
    assert one_pass["totals"]["sparsity"] == pytest.approx(0.5)
    assert sum(one_pass["modules"][n]["tokens"] for n in _experts(one_pass["modules"])
               if n.endswith("gate_proj")) == 2 * TOP_K * CALIBRATION["num_samples"] * CALIBRATION["seq_len"]
    compress_checkpoint({"model": src, "recipe": str(SPARSEGPT_50), "output": tmp_path / "one",
                         "dataset": calibration, "device": "cpu"})
    compress_checkpoint({"model": src, "recipe": str(SPARSEGPT_50), "output": tmp_path / "two",
                         "dataset": calibration, "device": "cpu"}, workers=LocalPool(2))
    one, two = SafetensorsCheckpoint(tmp_path / "one"), SafetensorsCheckpoint(tmp_path / "two")
    assert set(one.keys()) == set(two.keys())
    a, b = one.read(one.keys()), two.read(two.keys())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_gptq_fallback_is_exactly_round_to_nearest():
    """GPTQ on the identity Hessian that ``compress_without_tokens`` hands it gives RTN's very weights and scales."""
    from types import SimpleNamespace

    from service.engine.moe import compress_without_tokens
    from service.recipes.recipe import load_recipe

    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    gptq, rtn = (torch.nn.Linear(64, 32, bias=False) for _ in range(2))
    for module in (gptq, rtn):
        module.weight.data.copy_(weight)
    task = SimpleNamespace(name="e", module=gptq, compressor=load_recipe(GPTQ_W4).modifiers()[0], sparsity=0.0)
    assert compress_without_tokens(task, None)["fallback"] == "rtn"
    load_recipe(GPTQ_W4.replace("GPTQModifier", "QuantizationModifier")).modifiers()[0].compress_module(
        "e", rtn, None, 0.0)
    assert torch.equal(gptq.weight, rtn.weight) and torch.equal(gptq.weight_scale, rtn.weight_scale)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_oneshot_unfuses_an_in_memory_model(family, tok, tmp_path, held_out):
    """``oneshot`` on a model transformers loaded (fused 3-D experts): the experts become Linears with the same
    function, are pruned like any target, and the model saves in the Hub layout that transformers loads back."""
    from transformers import AutoModelForCausalLM

    from service.engine.calibration_data import calibration_tokens
    from service.engine.oneshot import oneshot, token_batches
    from tests.tiny_moe import make_moe_model

    model = make_moe_model(family)
    with torch.no_grad():
        fused = model(held_out).logits
    from service.engine.moe import unfuse_experts

    unfuse_experts(model)
    with torch.no_grad():
        torch.testing.assert_close(model(held_out).logits, fused, rtol=1e-5, atol=1e-5)
    ids = calibration_tokens(WIKI_VALID, tok, 8, 64)
    report = oneshot(model, str(SPARSEGPT_50), batches=token_batches(ids), device="cpu")
    experts = _experts(report["modules"])
    assert len(experts) == 2 * (8 if family == "qwen3_moe" else 4) * 3
    assert all(report["modules"][n]["sparsity"] == pytest.approx(0.5, abs=1e-6) for n in experts)
    model.save_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        ours = model(held_out).logits
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()(held_out).logits
    torch.testing.assert_close(reloaded, ours, rtol=1e-5, atol=1e-5)
