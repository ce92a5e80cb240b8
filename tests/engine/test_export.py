"""Streaming compression of checkpoint directories: what is written, how it reloads, and that nothing
half-written is left behind."""

from __future__ import annotations

import json

import pytest
import torch

from service.engine.calibration_data import calibration_tokens
from service.engine.compress import compress_checkpoint
from service.engine.export import INDEX_NAME
from service.engine.model_source import CheckpointError, StreamedModel
from service.engine.oneshot import oneshot, token_batches
from service.engine.options import CompressionOptions
from service.engine.text_data import load_tokenizer
from tests.fixture_paths import WIKI_VALID
from tests.tiny_models import RECIPE_2OF4, make_model, write_model

RECIPE_24 = RECIPE_2OF4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_export_reloads_with_the_in_memory_logits(tmp_path, arch):
    src = write_model(arch, tmp_path / "src")
    out = tmp_path / "out"
    report = compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=out, device="cpu",
                                                    dataset={"source": WIKI_VALID, "num_samples": 8, "seq_len": 32}))
    # The same compression in memory, on the same tokens.
    tokens = calibration_tokens(WIKI_VALID, load_tokenizer(src), 8, 32)
    expected = make_model(arch)
    oneshot(expected, RECIPE_24, batches=token_batches(tokens), device="cpu")

    import transformers as t

    cls = t.BertForMaskedLM if arch == "bert" else t.AutoModelForCausalLM
    reloaded = cls.from_pretrained(str(out)).eval()
    ids = tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    files = {p.name for p in out.iterdir()}
    assert {"config.json", INDEX_NAME, "recipe.yaml", "compression_report.json", "tokenizer.json"} <= files
    shards = sorted(p for p in files if p.endswith(".safetensors"))
    assert len(shards) == reloaded.config.num_hidden_layers + 1
    config = json.loads((out / "config.json").read_text())
    sparsity = config["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] == pytest.approx(0.5)
    assert len(sparsity["per_layer_sparsity"]) == reloaded.config.num_hidden_layers
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["re:.*lm_head"]
    on_disk = json.loads((out / "compression_report.json").read_text())
    assert set(on_disk["modules"]) == set(report["modules"])
    assert all({"sparsity", "loss", "seconds", "samples"} <= set(m) for m in on_disk["modules"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_only_one_block_is_in_memory_at_a_time(tmp_path, monkeypatch):
    src = write_model("llama", tmp_path / "src")
    seen = []
    original_load = StreamedModel.load

    def load(self, names, device):
        original_load(self, names, device)
        live = [n for n, p in self.model.named_parameters() if p.device.type != "meta"]
        seen.append((list(names), live))

    monkeypatch.setattr(StreamedModel, "load", load)
    compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=tmp_path / "out", device="cpu",
                                           dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    block_loads = [(names, live) for names, live in seen if names and names[0].startswith("model.layers.")]
    assert len(block_loads) == 3
    for names, live in block_loads:
        assert sorted(live) == sorted(names)  # the block's own weights and nothing else


def test_failure_leaves_no_output_and_no_temporary(tmp_path):
    src = write_model("llama", tmp_path / "src")
    with pytest.raises(ValueError, match="need 4000000 tokens"):
        compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=tmp_path / "out", device="cpu",
                                               dataset={"source": WIKI_VALID, "num_samples": 10000, "seq_len": 400}))
    bad = RECIPE_24.replace('mask_structure: "2:4"', 'mask_structure: "3:2"').replace("sparsity: 0.5", "sparsity: 0.6")
    with pytest.raises(ValueError, match="mask_structure"):
        compress_checkpoint(CompressionOptions(model=src, recipe=bad, output=tmp_path / "out", device="cpu",
                                               dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    src = write_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=out, device="cpu",
                                               dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    assert (out / "keep.txt").exists()
    compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=out, device="cpu", overwrite=True,
                                           dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    assert not (out / "keep.txt").exists() and (out / INDEX_NAME).exists()


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    src = write_model("llama", tmp_path / "src", safe_serialization=False) if False else None
    # transformers 5 always writes safetensors: make a pickle-only checkpoint by hand.
    src = write_model("llama", tmp_path / "src")
    state = make_model("llama").state_dict()
    for p in src.glob("*.safetensors"):
        p.unlink()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=tmp_path / "out", device="cpu",
                                               dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    report = compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=tmp_path / "out",
                                                    device="cpu", allow_pickle=True,
                                                    dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    assert report["totals"]["sparsity"] == pytest.approx(0.5)
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob(".stage*"))


def test_multi_stage_recipe_runs_stages_in_order(tmp_path):
    src = write_model("llama", tmp_path / "src")
    recipe = """
first_stage:
  pruning_modifiers:
    MagnitudePruningModifier:
      sparsity: 0.25
second_stage:
  pruning_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      preserve_sparsity_mask: true
"""
    report = compress_checkpoint(CompressionOptions(model=src, recipe=recipe, output=tmp_path / "out", device="cpu",
                                                    dataset={"source": WIKI_VALID, "num_samples": 4, "seq_len": 32}))
    assert report["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not list((tmp_path / "out").glob(".stage*"))


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="could not be downloaded from the Hugging Face Hub"):
        compress_checkpoint(CompressionOptions(model="someone/some-model", recipe=RECIPE_24, output=tmp_path / "out",
                                               device="cpu", dataset=WIKI_VALID))
    with pytest.raises(CheckpointError, match="does not exist"):
        compress_checkpoint(CompressionOptions(model=str(tmp_path / "nowhere"), recipe=RECIPE_24,
                                               output=tmp_path / "out", device="cpu", dataset=WIKI_VALID))


def test_bf16_checkpoint_stays_bf16_with_fp32_hessians(tmp_path):
    """A bf16 model calibrates in bf16 (its own matmul dtype) while Hessians accumulate in fp32; the output keeps
    the checkpoint's dtype and the 2:4 pattern."""
    from safetensors import safe_open

    model = make_model("llama").to(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).write_bytes((WIKI_VALID.parents[2] / "models" / "stories260K" / name).read_bytes())
    report = compress_checkpoint(CompressionOptions(model=src, recipe=RECIPE_24, output=tmp_path / "out",
                                                    device="cpu", dataset={"source": WIKI_VALID, "num_samples": 8,
                                                                           "seq_len": 32}))
    assert report["totals"]["sparsity"] == pytest.approx(0.5)
    assert all(m["loss"] >= 0 and m["loss"] == m["loss"] for m in report["modules"].values())  # finite, no NaN
    shard = sorted((tmp_path / "out").glob("model-00002-*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        weight = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert weight.dtype == torch.bfloat16
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
