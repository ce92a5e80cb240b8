"""FP8 and FP4 schemes end to end (issue 13): presets as compressed-tensors defines them, recipe errors, RTN and
GPTQ on stories260K, the compressed-tensors checkpoint transformers loads, and the streamed evaluation of it."""

import copy
import json

import pytest
import torch

from service.recipes import quantization_modifiers as qm
from service.recipes.recipe import RecipeError, load_recipe
from tests.fixture_paths import STORIES, WIKI_VALID

ct = pytest.importorskip("compressed_tensors")

FLOAT_SCHEMES = ("FP8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4")
# stories260K: q/k/v/o and gate/up read 64 inputs; down_proj reads 172, which no FP4 group (16, 32) divides.
FP4_IGNORE = ["lm_head", "re:.*down_proj$"]
# FP8_BLOCK's 128x128 tiles are larger than stories260K's 64-wide matrices: the same scheme with 32x32 tiles.
FP8_BLOCK32 = {"g": {"targets": ["re:.*(q|k|v|o)_proj$"],  # gate/up are [172, 64]
                     "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]},
                     "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32,
                                           "dynamic": True}}}
CASES = {  # name: modifier arguments
    "FP8_DYNAMIC": {"scheme": "FP8_DYNAMIC"},
    "FP8": {"scheme": "FP8"},
    "FP8_BLOCK32": {"config_groups": FP8_BLOCK32, "ignore": FP4_IGNORE},
    "NVFP4A16": {"scheme": "NVFP4A16", "ignore": FP4_IGNORE},
    "NVFP4": {"scheme": "NVFP4", "ignore": FP4_IGNORE},
    "MXFP4": {"scheme": "MXFP4", "ignore": FP4_IGNORE},
}


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM

    from service.engine.calibration_data import calibration_tokens
    from service.engine.oneshot import token_batches
    from service.engine.text_data import load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dense = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    batches = token_batches(calibration_tokens(WIKI_VALID, load_tokenizer(STORIES), 16, 128))
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    yield dense, batches, ids
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", FLOAT_SCHEMES)
def test_presets_are_compressed_tensors_own(name):
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    from service.engine.quantized_export import quantization_config

    ours = quantization_config([qm.QuantizationModifier(scheme=name)])["config_groups"]["group_0"]
    theirs = preset_name_to_scheme(name, ["Linear"]).model_dump(mode="json")
    for part in ("weights", "input_activations"):
        assert ours[part] == theirs[part], part


@pytest.mark.parametrize("body, words", [
    ({"scheme": "FP9"}, ["scheme", "FP8_DYNAMIC", "NVFP4", "MXFP4", "W4A16"]),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float",
                                                                  "strategy": "tensor_group", "group_size": 32}}}},
     ["config_groups.g.weights", "group_size", "NVFP4", "16"]),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "group_size": 16,
                                                                  "scale_dtype": "uint8"}}}},
     ["config_groups.g.weights", "group_size", "MXFP4", "32"]),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                  "strategy": "block"}}}},
     ["config_groups.g.weights", "block_structure"]),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "group_size": 32,
                                                                  "scale_dtype": "float8_e4m3fn"}}}},
     ["scale_dtype", "uint8"]),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 6, "type": "float"}}}},
     ["num_bits", "8", "4"]),
    ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"},
                              "input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor"}}}},
     ["input_activations.dynamic"]),
])
def test_recipe_errors_name_the_field_and_allowed_values(body, words):
    with pytest.raises(RecipeError) as err:
        load_recipe([{"QuantizationModifier": body}])
    message = str(err.value)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("kwargs, pattern", [
    ({"scheme": "NVFP4A16"}, r"model\.layers\.0\.mlp\.down_proj: group_size 16 does not divide its input "
                             r"dimension 172; add the module to ignore"),
    ({"scheme": "MXFP4"}, r"down_proj: group_size 32 does not divide"),
    ({"scheme": "FP8_BLOCK"}, r"model\.layers\.0\.self_attn\.q_proj: block_structure \[128, 128\] does not "
                              r"divide its weight shape \[64, 64\]; add the module to ignore"),
])
def test_shapes_that_do_not_fit_name_the_module_and_the_fix(stories, kwargs, pattern):
    from service.engine.oneshot import oneshot

    dense, _, _ = stories
    with pytest.raises(ValueError, match=pattern):
        oneshot(copy.deepcopy(dense), [qm.QuantizationModifier(**kwargs)], device="cpu")


def _float32_after_decompression(model, args):
    # compressed-tensors decompresses FP4 weights to bfloat16 (its choice, for bf16 models); a float32 model needs
    # them back in float32. Registered after the library's decompression pre-hook, so it runs right after it.
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_export_reloads_in_transformers_and_streams_to_the_in_memory_model(
        stories, tmp_path, case, method):
    from transformers import AutoModelForCausalLM

    from service.algorithms.quantization import fake_quantize
    from service.engine.oneshot import oneshot
    from service.engine.perplexity import perplexity, perplexity_streamed
    from service.engine.quantized_export import save_quantized

    dense, batches, ids = stories
    modifier = (qm.QuantizationModifier if method == "rtn" else qm.GPTQModifier)(**CASES[case])
    model = copy.deepcopy(dense)
    oneshot(model, [modifier], batches=batches[:4], device="cpu")
    group = modifier.groups[0]
    q = model.model.layers[1].self_attn.q_proj
    g = getattr(q, "weight_global_scale", None)
    assert torch.equal(fake_quantize(q.weight, group.weights, q.weight_scale, global_scale=g), q.weight)
    if group.inputs is not None and group.inputs.dynamic is not True:
        assert hasattr(q, "input_scale" if group.inputs.strategy == "tensor" else "input_global_scale")
    hooks = qm.attach_scheme_activation_quantization(model)
    ours = _logits(model, ids)

    out = save_quantized(model, STORIES, tmp_path / "out")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == {"F": "float-quantized", "N": "nvfp4-pack-quantized", "M": "mxfp4-pack-quantized"}[case[0]]
    # `llmpress eval`'s streamed path reads the checkpoint back as the model it computes, exactly.
    tokens = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(1))
    assert perplexity_streamed(out, tokens, seq_len=256, device="cpu").ppl == pytest.approx(
        perplexity(model, tokens, seq_len=256).ppl, rel=1e-5)

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    loaded.register_forward_pre_hook(_float32_after_decompression)
    theirs = _logits(loaded, ids)
    if case.startswith("NVFP4"):
        # The library decompresses NVFP4's code * scale / global_scale to bfloat16: the weights agree within that
        # rounding, and with those weights our model computes what transformers' does (activation quantization
        # included; FP4 activations turn a weight's last-bit difference into a code flip, so logits are compared
        # on the same weights).
        for name, m in model.named_modules():
            if hasattr(m, "weight_global_scale"):
                w = loaded.get_submodule(name).weight
                assert torch.allclose(w, m.weight, rtol=2**-8, atol=0), name
                m.weight.data = w.detach().clone()
        ours = _logits(model, ids)
    assert (ours - theirs).abs().max() < 1e-4
    for h in hooks:
        h.remove()


def test_static_input_scales_need_observed_inputs(stories):
    from service.engine.oneshot import oneshot

    dense, batches, _ = stories
    modifier = qm.QuantizationModifier(scheme="FP8")
    assert modifier.observes_inputs and modifier.statistic == "input_range"
    assert not qm.QuantizationModifier(scheme="FP8_DYNAMIC").observes_inputs
    with pytest.raises(ValueError, match="dataset: QuantizationModifier needs calibration data; give a dataset"):
        oneshot(copy.deepcopy(dense), [modifier], device="cpu")


def test_fp8_static_input_scale_is_the_calibration_absmax(stories):
    from service.engine.oneshot import oneshot

    dense, batches, _ = stories
    model = copy.deepcopy(dense)
    seen = {}
    q = dense.model.layers[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda m, a: seen.setdefault("max", []).append(a[0].abs().max()))
    with torch.no_grad():
        for b in batches[:4]:
            dense(b["input_ids"])
    handle.remove()
    oneshot(model, [qm.QuantizationModifier(scheme="FP8")], batches=batches[:4], device="cpu")
    scale = model.model.layers[0].self_attn.q_proj.input_scale
    assert torch.equal(scale, (torch.stack(seen["max"]).max() / 448).reshape(1))


def test_nvfp4_global_scales_are_shared_by_fused_modules(stories):
    from service.algorithms import float_quantization as fq
    from service.engine.oneshot import oneshot

    dense, _, _ = stories
    model = copy.deepcopy(dense)
    oneshot(model, [qm.QuantizationModifier(scheme="NVFP4A16", ignore=FP4_IGNORE)], device="cpu")
    for layer, original in zip(model.model.layers, dense.model.layers):
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = "self_attn" if names[0] == "q_proj" else "mlp"
            mods = [layer.get_submodule(f"{parent}.{n}") for n in names]
            own = [fq.global_scale(original.get_submodule(f"{parent}.{n}").weight, mods[0].quantization_args)
                   for n in names]
            for m in mods:
                assert torch.equal(m.weight_global_scale, torch.stack(own).min().reshape(1))
        assert torch.equal(layer.self_attn.o_proj.weight_global_scale,
                           fq.global_scale(original.self_attn.o_proj.weight, mods[0].quantization_args))


@pytest.mark.parametrize("modifier, scheme", [("QuantizationModifier", "NVFP4"), ("GPTQModifier", "FP8")])
def test_streamed_calibrated_scales_are_the_same_bytes_with_two_workers(tmp_path, modifier, scheme):
    """Calibrated input scales are pipeline statistics: two data-parallel workers, each with half the batches,
    merge their ranges in rank order and write the very bytes of one process."""
    from service.engine.compress import compress_checkpoint
    from service.engine.data_parallel import LocalPool
    from service.engine.model_source import SafetensorsCheckpoint

    recipe = [{modifier: {"targets": ["Linear"], "ignore": FP4_IGNORE, "scheme": scheme}}]
    job = {"model": STORIES, "recipe": recipe, "device": "cpu",
           "dataset": {"source": str(WIKI_VALID), "num_samples": 8, "seq_len": 64, "batch_size": 2}}
    one = compress_checkpoint({**job, "output": tmp_path / "one"})
    compress_checkpoint({**job, "output": tmp_path / "two"}, workers=LocalPool(2))
    a, b = SafetensorsCheckpoint(tmp_path / "one"), SafetensorsCheckpoint(tmp_path / "two")
    key = "input_global_scale" if scheme == "NVFP4" else "input_scale"
    scales = [k for k in a.keys() if k.endswith(key)]
    assert len(scales) == 5 * 6  # 5 layers: q/k/v/o and gate/up (down_proj ignored)
    # q/k/v read one input: one range, one scale
    qkv = [ta_ for ta_ in a.read([f"model.layers.2.self_attn.{n}_proj.{key}" for n in "qkv"]).values()]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    ta, tb = a.read(list(a.keys())), b.read(list(b.keys()))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    q = one["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["input_tokens"] == 8 * 64
