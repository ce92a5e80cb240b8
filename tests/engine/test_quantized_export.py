import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from safetensors import safe_open  # noqa: E402

from service.algorithms.quantization import QuantArgs, quantize  # noqa: E402
from service.engine.oneshot import oneshot, token_batches  # noqa: E402
from service.recipes import quantization_modifiers as qm  # noqa: E402
import service.recipes.pruning_modifiers  # noqa: E402,F401  (registers SparseGPTModifier)
from service.engine.quantized_export import (  # noqa: E402
    compress_quantized_tensors, load_quantized, quantization_config, save_quantized,
)
from tests.fixture_paths import STORIES, WIKI_VALID  # noqa: E402

# stories260K: q/k/v/o/gate/up read 64 inputs (groups of 32 fit), down_proj reads 172 = 4 * 43.
W4_G32 = {
    "group_0": {"targets": ["re:.*(q|k|v|o|gate|up)_proj$"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}},
    "group_1": {"targets": ["re:.*down_proj$"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}},
}
W8_CHANNEL = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                             "strategy": "channel"}}}
W4_ASYM_G4 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                             "strategy": "group", "group_size": 4}}}


@pytest.fixture(scope="module")
def dense():
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads and loses a lot on a busy machine
    yield AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))


def _quantized(dense, modifier):
    model = copy.deepcopy(dense)
    oneshot(model, [modifier], device="cpu")
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("groups, fmt", [(W4_G32, "pack-quantized"), (W8_CHANNEL, "pack-quantized")])
def test_transformers_loads_our_checkpoint_to_the_same_logits(dense, ids, tmp_path, groups, fmt):
    from transformers import AutoModelForCausalLM

    model = _quantized(dense, qm.QuantizationModifier(config_groups=groups))
    save_quantized(model, STORIES, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() < 1e-4
    # And the weights themselves are exactly ours (not merely close).
    for name, m in loaded.named_modules():
        if name.endswith("mlp.down_proj") or name.endswith("self_attn.q_proj"):
            assert torch.equal(m.weight, model.get_submodule(name).weight), name


def test_library_decompression_of_asymmetric_packed_checkpoint(dense, ids, tmp_path):
    model = _quantized(dense, qm.QuantizationModifier(config_groups=W4_ASYM_G4))
    save_quantized(model, STORIES, tmp_path)
    loaded = load_quantized(tmp_path)
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() < 1e-4
    q = model.model.layers[2].mlp.up_proj
    assert torch.equal(loaded.model.layers[2].mlp.up_proj.weight, q.weight)


def test_packed_codes_are_our_integer_codes(dense):
    model = _quantized(dense, qm.QuantizationModifier(config_groups=W4_ASYM_G4))
    module = model.model.layers[1].self_attn.o_proj
    tensors = compress_quantized_tensors("model.layers.1.self_attn.o_proj", module)
    prefix = "model.layers.1.self_attn.o_proj."
    names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    assert sorted(tensors) == [prefix + k for k in names]
    assert tensors[prefix + "weight_packed"].dtype == torch.int32
    assert tensors[prefix + "weight_packed"].shape == (64, 64 * 4 // 32)
    codes = unpack_from_int32(tensors[prefix + "weight_packed"], 4, torch.Size([64, 64]))
    args = module.quantization_args
    assert torch.equal(codes, quantize(module.weight, args, module.weight_scale, module.weight_zero_point))
    zp = unpack_from_int32(tensors[prefix + "weight_zero_point"], 4, torch.Size([64, 16]), packed_dim=0)
    assert torch.equal(zp, module.weight_zero_point)


def test_w8a8_uses_int_quantized_int8_weights(dense):
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
                          "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True}}}
    model = _quantized(dense, qm.QuantizationModifier(config_groups=groups))
    module = model.model.layers[0].mlp.down_proj
    tensors = compress_quantized_tensors("x", module)
    assert sorted(tensors) == ["x.weight", "x.weight_scale"]  # symmetric: no zero point stored
    assert tensors["x.weight"].dtype == torch.int8 and tensors["x.weight_scale"].shape == (64, 1)
    assert torch.equal(tensors["x.weight"].float() * tensors["x.weight_scale"], module.weight)
    qc = quantization_config(model)
    assert qc["format"] == "int-quantized"
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"


def test_mixed_schemes_target_modules_by_name_and_modifier_config_matches(dense):
    modifier = qm.QuantizationModifier(config_groups=W4_G32)
    model = _quantized(dense, modifier)
    qc = quantization_config(model)
    groups = qc["config_groups"]
    assert len(groups) == 2
    names = sorted(t for g in groups.values() for t in g["targets"])
    assert len(names) == 35 and "model.layers.4.mlp.down_proj" in names
    from_recipe = quantization_config([modifier])
    assert [g["weights"] for g in from_recipe["config_groups"].values()] == [g["weights"] for g in groups.values()]
    assert from_recipe["config_groups"]["group_0"]["targets"] == ["re:.*(q|k|v|o|gate|up)_proj$"]


def test_actorder_group_is_refused_at_export():
    lin = torch.nn.Linear(8, 4)
    lin.quantization_args = QuantArgs(4, True, "group", 4)
    lin.register_buffer("weight_scale", torch.ones(4, 2))
    lin.register_buffer("weight_zero_point", torch.zeros(4, 2, dtype=torch.int8))
    lin.register_buffer("weight_g_idx", torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="actorder 'group'"):
        compress_quantized_tensors("lin", lin)


def test_unquantized_module_is_an_error():
    with pytest.raises(ValueError, match="carries no quantization"):
        compress_quantized_tensors("lin", torch.nn.Linear(4, 4))


def test_sparse_gptq_checkpoint_round_trips_and_keeps_2of4(dense, ids, tmp_path):
    from service.engine.calibration_data import calibration_tokens
    from service.engine.text_data import load_tokenizer

    tok = load_tokenizer(STORIES)
    batches = token_batches(calibration_tokens(WIKI_VALID, tok, 32, 256))
    model = copy.deepcopy(dense)
    recipe = {
        "sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {"mask_structure": "2:4"}}},
        "quantization_stage": {"quantization_modifiers": {"GPTQModifier": {"config_groups": W4_G32}}},
    }
    import yaml

    oneshot(model, yaml.safe_dump(recipe, sort_keys=False), batches=batches, device="cpu")
    save_quantized(model, STORIES, tmp_path, sparsity_structure="2:4")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    assert qc["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() < 1e-4
    for name, m in loaded.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            w = m.weight
            assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.down_proj.weight_packed" in f.keys()
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
