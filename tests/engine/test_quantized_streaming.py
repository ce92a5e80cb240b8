"""A quantization recipe through the streaming compress_checkpoint: the output is a compressed-tensors
checkpoint that transformers loads back to exactly the weights the in-memory oneshot computes."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch

from service.engine.calibration_data import calibration_tokens
from service.engine.compress import compress_checkpoint
from service.engine.oneshot import oneshot, token_batches
from service.engine.options import CompressionOptions, Evaluation
from service.engine.text_data import load_tokenizer
from tests.fixture_paths import FIXTURES, STORIES

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
    report = compress_checkpoint(CompressionOptions(model=STORIES, recipe=SPARSE_THEN_GPTQ, output=tmp_path / "out",
                                                    evals=[Evaluation(name="tiny", source=TINY, max_tokens=4096)],
                                                    device="cpu", dataset={"source": CALIB, "num_samples": 16,
                                                                           "seq_len": 64}))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert list(quant["config_groups"].values())[0]["targets"] == ["Linear"] and "lm_head" in quant["ignore"]
    assert 1.0 < report["perplexity"]["tiny"]["ratio"] < 20
    # sparsity is the pruning's, not also the weights that rounded to zero (about 18% at int4)
    assert report["totals"]["sparsity"] == 0.5 and config["sparsity_config"]["global_sparsity"] == 0.5

    from service.engine.quantized_export import load_quantized

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
        compress_checkpoint(CompressionOptions(model=STORIES, recipe=recipe, output=tmp_path / "out",
                                               dataset={"source": CALIB, "num_samples": 4, "seq_len": 32}))
    assert not (tmp_path / "out").exists()


ROTATE_RTN = """
quantization_stage:
  quantization_modifiers:
    SpinQuantModifier: {rotations: [R1, R2], transform_type: hadamard}
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0: {targets: [Linear], weights: {num_bits: 4, type: int, symmetric: true, strategy: channel}}
"""
ROTATE_ONLY = """
rotation_stage:
  rotation_modifiers:
    SpinQuantModifier: {rotations: [R1, R2], transform_type: random-hadamard}
"""


def test_streamed_rotation_is_exact_and_streamed_rotate_quantize_equals_oneshot(tmp_path):
    tokenizer = load_tokenizer(STORIES)
    probe = calibration_tokens(TINY, tokenizer, 1, 256)
    dense = load(STORIES)
    compress_checkpoint(CompressionOptions(model=STORIES, recipe=ROTATE_ONLY, output=tmp_path / "rotated",
                                           device="cpu"))
    config = json.loads((tmp_path / "rotated" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    rotated = load(tmp_path / "rotated")
    with torch.no_grad():
        assert (rotated(probe).logits - dense(probe).logits).abs().max() < 1e-3
        assert not torch.allclose(rotated.model.embed_tokens.weight, dense.model.embed_tokens.weight)

    compress_checkpoint(CompressionOptions(model=STORIES, recipe=ROTATE_RTN, output=tmp_path / "w4", device="cpu"))
    streamed = load(tmp_path / "w4")
    in_memory = load(STORIES)
    oneshot(in_memory, ROTATE_RTN, device="cpu")
    with torch.no_grad():
        assert (streamed(probe).logits - in_memory(probe).logits).abs().max() < 1e-4


ONLINE = """
rotation_stage:
  rotation_modifiers:
    SpinQuantModifier: {rotations: [R1, R2, R3, R4], transform_type: random-hadamard}
"""


def _compressed_tensors_reader(directory):
    """``directory`` as compressed-tensors itself runs it: transformers' model with the fused weights, the library's
    own transforms built from ``transform_config``, their tensors loaded from beside the weights."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file

    from service.engine.transform_export import load_transform_tensors

    config = json.loads((directory / "config.json").read_text())
    model = load(directory)
    apply_transform_config(model, TransformConfig.model_validate(config["transform_config"]))
    tensors = {k: v for f in sorted(directory.glob("model-*.safetensors"))
               for k, v in load_file(str(f)).items() if "_input." in k or "_q_attn." in k or "_k_cache." in k}
    assert load_transform_tensors(model, tensors) == 15
    return model


def _bridge_renamed_cache_argument(model) -> list:
    """compressed-tensors <= 0.20.1 hands its key hook (``k_cache`` transforms) to attention as the keyword
    ``past_key_value`` when the attention's signature has no ``past_key_values``; transformers 5.24 renamed that
    argument ``cache``, so the hook is never called and R3 never rotates the keys. This moves the library's cache
    wrapper to the argument the attention reads, and nothing else. Returns the calls the library's hook got."""
    from compressed_tensors.modeling import kvcache

    calls = []
    for layer in model.model.layers:
        layer.self_attn.kv_cache.register_forward_pre_hook(lambda module, args: calls.append(1))

        def bridge(module, args, kwargs):
            wrapper = kwargs.pop("past_key_value", None)
            if isinstance(wrapper, kvcache.QuantizedKVCache):  # what the library's hook does, under the new name
                wrapper.add_past_key_values(kwargs.get("cache"))
                kwargs["cache"] = wrapper
            return args, kwargs

        layer.self_attn.register_forward_pre_hook(bridge, with_kwargs=True)  # after the library's own hook
    return calls


def test_streamed_online_rotations_are_recorded_and_read_back_by_ours_and_by_compressed_tensors(tmp_path):
    from service.engine.model_source import load_output
    from service.engine.transform_export import DESCRIPTION_KEY

    report = compress_checkpoint(CompressionOptions(model=STORIES, recipe=ONLINE, output=tmp_path / "out",
                                                    device="cpu",
                                                    evals=[Evaluation(name="tiny", source=TINY, max_tokens=4096)]))
    assert abs(report["perplexity"]["tiny"]["ratio"] - 1) < 1e-4  # exact, online rotations running
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config[DESCRIPTION_KEY]) == {"R3", "R4"} and len(config[DESCRIPTION_KEY]["R4"]) == 5
    groups = config["transform_config"]["config_groups"]
    assert {a["location"] for a in groups["R3"]["apply"]} == {"q_attn", "k_cache"} and groups["R3"]["head_dim"] == 8
    assert groups["R4"]["apply"][0]["location"] == "input"

    probe = calibration_tokens(TINY, load_tokenizer(STORIES), 1, 256)
    dense = load(STORIES)
    with torch.no_grad():
        expected = dense(probe).logits
        assert (load_output(tmp_path / "out")(probe).logits - expected).abs().max() < 1e-3
        fused_only = load(tmp_path / "out")  # transformers alone: the fused weights, no online transforms
        assert (fused_only(probe).logits - expected).abs().max() > 1.0

        reader = _compressed_tensors_reader(tmp_path / "out")
        if (reader(probe).logits - expected).abs().max() >= 1e-3:
            # Only the known upstream gap may explain a mismatch: the library's key hook was never called. With its
            # cache wrapper handed to the renamed argument, the library's own transforms give the dense logits.
            reader = _compressed_tensors_reader(tmp_path / "out")
            calls = _bridge_renamed_cache_argument(reader)
            assert "past_key_values" not in inspect.signature(reader.model.layers[0].self_attn.forward).parameters
            logits = reader(probe).logits
            assert len(calls) == 5, "compressed-tensors' key hook still misses the attention: not the known gap"
            warnings.warn("compressed-tensors does not call its k_cache transforms under this transformers "
                          "(argument renamed 'cache'); checked with the argument bridged", UserWarning)
        else:
            logits = reader(probe).logits
        assert (logits - expected).abs().max() < 1e-3
    from service.engine.model_source import CheckpointError

    with pytest.raises(CheckpointError, match="already rotated with online transforms"):
        compress_checkpoint(CompressionOptions(model=tmp_path / "out", recipe=ROTATE_ONLY, output=tmp_path / "again",
                                               device="cpu"))


def test_online_rotations_in_an_early_stage_are_refused(tmp_path):
    recipe = ONLINE + SPARSE_THEN_GPTQ.split("quantization_stage:")[0].replace("sparsity_stage", "later_stage")
    with pytest.raises(ValueError, match="SpinQuantModifier in stage 'rotation_stage' must be in the last stage"):
        compress_checkpoint(CompressionOptions(model=STORIES, recipe=recipe, output=tmp_path / "out",
                                               dataset={"source": CALIB, "num_samples": 4, "seq_len": 32}))
    assert not (tmp_path / "out").exists()


def test_streaming_refuses_learned_rotations_with_a_clear_error(tmp_path):
    recipe = "rotation_stage:\n  rotation_modifiers:\n    SpinQuantModifier: {rotations: [R1], learnable: true}\n"
    field = "learnable"
    with pytest.raises(ValueError, match=f"SpinQuantModifier.*{field}.*oneshot"):
        compress_checkpoint(CompressionOptions(model=STORIES, recipe=recipe, output=tmp_path / "out", device="cpu"))
    assert not (tmp_path / "out").exists()


ROTATE_ONLINE_W4_ASYM = """
quantization_stage:
  quantization_modifiers:
    SpinQuantModifier: {rotations: [R1, R2, R3, R4], transform_type: random-hadamard}
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0: {targets: ["re:.*(q|k|v|o|gate|up)_proj$"], weights: {num_bits: 4, type: int, symmetric: false,
                                                                       strategy: group, group_size: 16}}
        group_1:
          targets: ["re:.*down_proj$"]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}
"""


def test_quantized_online_output_is_scored_streamed_as_the_model_it_computes(tmp_path):
    """The quality gate streams quantized outputs block by block too: packed int4 with packed zero points and int8
    modules (int-quantized, as W8A8 is stored) decompressed one module at a time, R3/R4 attached to the skeleton:
    the same perplexity as the whole decompressed model with its online rotations (load_output)."""
    from service.engine.model_source import StreamedModel, load_output
    from service.engine.perplexity import perplexity, perplexity_streamed
    from service.engine.text_data import read_texts, tokenize

    report = compress_checkpoint(CompressionOptions(model=STORIES, recipe=ROTATE_ONLINE_W4_ASYM,
                                                    output=tmp_path / "out", device="cpu",
                                                    evals=[Evaluation(name="tiny", source=TINY, max_tokens=4096)]))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "mixed-precision"
    source = StreamedModel(tmp_path / "out", compressed=True)
    assert "sparsity_config" not in config and report["totals"]["sparsity"] == 0.0  # nothing was pruned
    formats = {scheme.format for _, scheme in source.compressed.values()}
    assert len(source.compressed) == 35 and formats == {"pack-quantized", "int-quantized"}
    ids = tokenize(load_tokenizer(STORIES), read_texts(TINY), max_tokens=4096)
    streamed = perplexity_streamed(tmp_path / "out", ids, device="cpu").ppl
    whole = perplexity(load_output(tmp_path / "out"), ids).ppl
    assert streamed == pytest.approx(whole, rel=1e-5)
    assert report["perplexity"]["tiny"]["after"] == pytest.approx(whole, rel=1e-5)
    assert 1.0 < report["perplexity"]["tiny"]["ratio"] < 1.5
    from service.engine.model_source import CheckpointError

    with pytest.raises(CheckpointError, match="already quantized; compress its unquantized original"):
        compress_checkpoint(CompressionOptions(model=tmp_path / "out", recipe=ROTATE_ONLY, output=tmp_path / "again",
                                               device="cpu"))
    assert not (tmp_path / "again").exists()
