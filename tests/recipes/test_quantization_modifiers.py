"""service/recipes/quantization_modifiers.py: RTN and GPTQ modifiers (presets, config groups, activation
quantization) and their quality on stories260K against llm-compressor's figures."""

import copy

import pytest
import torch
import torch.nn.functional as F

from service.recipes import quantization_modifiers as qm
import service.recipes.pruning_modifiers  # noqa: F401  (registers SparseGPTModifier for recipes)
from service.algorithms.quantization import (
    QuantArgs, dequantize, fake_quantize, quantization_params, quantize,
)
from service.recipes.recipe import RecipeError, load_recipe

ct = pytest.importorskip("compressed_tensors")


def test_presets_follow_compressed_tensors():
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as CT

    for name in ("W8A16", "W4A16", "W8A8", "W4A8", "W4A4", "W4A16_ASYM"):
        mine = qm.QuantizationModifier(scheme=name).groups[0]
        theirs = CT[name]
        w = theirs["weights"]
        ours = mine.weights
        assert (ours.num_bits, ours.symmetric, ours.strategy, ours.group_size) == (
            w.num_bits, w.symmetric, _value(w.strategy), w.group_size)
        a = theirs.get("input_activations")
        assert (mine.inputs is None) == (a is None)
        if a is not None:
            inputs = mine.inputs
            assert (inputs.num_bits, inputs.strategy, inputs.dynamic) == (a.num_bits, _value(a.strategy), True)


def _value(enum_or_str):
    return str(getattr(enum_or_str, "value", enum_or_str))


def test_config_groups_first_match_wins_and_strategy_is_inferred():
    mod = qm.GPTQModifier(config_groups={
        "attn": {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 8, "group_size": -1}},
        "rest": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32, "actorder": "static"},
                 "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True}},
    })
    lin = torch.nn.Linear(4, 4)
    attn = mod.group_for("model.layers.0.self_attn.q_proj", lin)
    rest = mod.group_for("model.layers.0.mlp.up_proj", lin)
    assert attn.weights == QuantArgs(8, True, "channel") and attn.inputs is None
    assert rest.weights == QuantArgs(4, True, "group", 32) and rest.actorder == "static"
    assert rest.inputs == QuantArgs(8, True, "token", dynamic=True)
    # scheme as {preset: targets}, llm-compressor's other spelling
    two = qm.QuantizationModifier(scheme={"W8A8": ["re:.*mlp.*"], "w4a16": ["re:.*self_attn.*"]})
    assert two.group_for("model.layers.0.mlp.up_proj", lin).weights == QuantArgs(8, True, "channel")
    assert two.group_for("model.layers.0.self_attn.o_proj", lin).weights == QuantArgs(4, True, "group", 128)
    assert two.target_patterns == ["re:.*mlp.*", "re:.*self_attn.*"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"scheme": "FP9"}, ["scheme", "W4A16", "FP8", "NVFP4"]),
        ({}, ["scheme", "config_groups"]),
        ({"scheme": "W4A16", "config_groups": {}}, ["exactly one"]),
        ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "fp"}}}},
         ["config_groups.g.weights.type", "int", "float"]),
        ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "rows"}}}},
         ["config_groups.g.weights", "strategy", "channel"]),
        ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "colour": 1}}}},
         ["colour", "num_bits"]),
        ({"scheme": "W4A16", "actorder": "dynamic"}, ["actorder", "static"]),
        ({"scheme": "W4A16", "dampening_frac": -1}, ["dampening_frac"]),
        ({"scheme": "W4A16", "kv_cache_scheme": {"num_bits": 8}}, ["kv_cache_scheme"]),
    ],
)
def test_recipe_errors_name_the_field_and_allowed_values(body, words):
    with pytest.raises(RecipeError) as err:
        load_recipe([{"GPTQModifier": body}])
    message = str(err.value)
    assert "GPTQModifier" in message
    for word in words:
        assert word in message, message


def test_group_size_that_does_not_divide_is_an_error_naming_the_module():
    from service.engine.oneshot import oneshot
    from tests.tiny_models import make_model

    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size 128 does not divide"):
        oneshot(make_model("llama"), [qm.QuantizationModifier(scheme="W4A16")], device="cpu")


def test_rtn_modifier_quantizes_every_block_linear_and_leaves_lm_head():
    from service.engine.oneshot import oneshot
    from tests.tiny_models import make_model

    model = make_model("llama")
    dense = copy.deepcopy(model)
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "symmetric": False, "strategy": "group",
                                                         "group_size": 32}}}
    report = oneshot(model, [qm.QuantizationModifier(config_groups=groups)], device="cpu")
    args = QuantArgs(4, False, "group", 32)
    quantized = 0
    for (name, m), d in zip(model.named_modules(), dense.modules()):
        if not isinstance(m, torch.nn.Linear):
            continue
        if name == "lm_head":
            assert torch.equal(m.weight, d.weight) and not hasattr(m, "weight_scale")
            continue
        assert torch.equal(m.weight, fake_quantize(d.weight, args)), name
        scale, zero = quantization_params(d.weight, args)
        assert torch.equal(m.weight_scale, scale) and torch.equal(m.weight_zero_point, zero)
        assert m.quantization_args == args and m.input_quantization_args is None
        assert report["modules"][name]["bits"] == 4
        quantized += 1
    assert quantized == 3 * 7


def test_attach_activation_quantization_matches_manual_linear():
    from tests.tiny_models import make_model

    model = make_model("llama")
    ids = torch.randint(0, 512, (2, 12))
    args = QuantArgs(8, True, "token", dynamic=True)
    seen = {}
    q_proj = model.model.layers[1].self_attn.q_proj
    # Registered before the quantization hooks, so it sees the raw input; the forward hook sees what q_proj used.
    q_proj.register_forward_pre_hook(lambda m, inp: seen.update(raw=inp[0]))
    q_proj.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], y=out))
    with torch.no_grad():
        base = model(ids).logits
        handles = qm.attach_activation_quantization(model, args)
        quantized = model(ids).logits
    assert len(handles) == 3 * 7  # lm_head ignored by default
    x, raw = seen["x"], seen["raw"]
    ref = torch.stack([  # slow per-token reference
        torch.clamp(torch.round(t / (t.abs().max() / 127.5)), -128, 127) * (t.abs().max() / 127.5)
        for t in raw.reshape(-1, raw.shape[-1])
    ]).reshape(raw.shape)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert not torch.equal(x, raw)
    torch.testing.assert_close(seen["y"], F.linear(x, q_proj.weight))
    assert not torch.equal(base, quantized)
    assert (base - quantized).abs().max() < 0.1 * base.abs().max()
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


# ------------------------------------------------------------------------------------------------ real model

TWO_STAGES = """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
quantization_stage:
  quantization_modifiers:
    GPTQModifier:
      ignore: ["lm_head"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 4}
"""


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM

    from service.engine.calibration_data import calibration_tokens
    from service.engine.oneshot import token_batches
    from service.engine.text_data import load_tokenizer, read_texts, tokenize
    from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads
    tok = load_tokenizer(STORIES)
    dense = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    evals = [tokenize(tok, read_texts(FIXTURES / "data" / "wikitext-2" / "test.txt"), max_tokens=40960),
             tokenize(tok, read_texts(FIXTURES / "data" / "tinystories" / "valid-subset.txt"))]
    batches = token_batches(calibration_tokens(WIKI_VALID, tok, 128, 256))
    yield dense, evals, batches
    torch.set_num_threads(threads)


def test_sparsegpt_then_gptq_keeps_every_2of4_group(stories):
    from service.engine.oneshot import oneshot

    dense, _, batches = stories
    model = copy.deepcopy(dense)
    report = oneshot(model, TWO_STAGES, batches=batches[:4], device="cpu")
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            w = m.weight.detach()
            assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
            args = m.quantization_args
            assert args == QuantArgs(4, False, "group", 4)
            codes = quantize(w, args, m.weight_scale, m.weight_zero_point)
            assert torch.equal(dequantize(codes, args, m.weight_scale, m.weight_zero_point), w), name
            assert report["modules"][name]["modifier"] == "GPTQModifier" and "loss" in report["modules"][name]
            n += 1
    assert n == 5 * 7


W4_CHANNEL = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                             "strategy": "channel"}}}
LLMC_RTN_W4 = (243.4, 6.368)  # llm-compressor QuantizationModifier W4 per-channel on stories260K


def test_rtn_reproduces_llm_compressor_and_gptq_beats_it(stories):
    from service.engine.oneshot import oneshot
    from service.engine.perplexity import perplexity

    dense, evals, batches = stories
    rtn = copy.deepcopy(dense)
    oneshot(rtn, [qm.QuantizationModifier(config_groups=W4_CHANNEL)], device="cpu")
    rtn_ppl = [perplexity(rtn, ids).ppl for ids in evals]
    assert rtn_ppl == pytest.approx(LLMC_RTN_W4, rel=1e-3)
    gptq = copy.deepcopy(dense)
    oneshot(gptq, [qm.GPTQModifier(config_groups=W4_CHANNEL)], batches=batches, device="cpu")
    gptq_ppl = [perplexity(gptq, ids).ppl for ids in evals]
    assert gptq_ppl[0] < rtn_ppl[0] and gptq_ppl[1] < rtn_ppl[1], (gptq_ppl, rtn_ppl)


def test_rotations_beat_no_rotation_on_both_texts(stories):
    """Issue 4's benefit criteria on stories260K: R1-R4 + W4A4 beats W4A4 on WikiText-2 and TinyStories, and
    learning R1+R2 for W4 RTN lowers its calibration loss. That learned R1+R2 + W4 RTN then beats plain W4 RTN on
    both texts takes the full 150 steps (about 3 minutes here): bench/quality_rotations.py measures it and
    bench/learned_rotation_spread.py its spread over calibration orders (bench/RESULTS.md), outside the timed suite."""
    from service.engine.perplexity import perplexity
    from service.recipes.spinquant import SpinQuantModifier, apply_spinquant

    dense, evals, batches = stories
    w4, a4 = QuantArgs(num_bits=4), QuantArgs(num_bits=4, strategy="token", dynamic=True)

    def rtn(model):
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(fake_quantize(module.weight, w4))
        return model

    def ppl(model):
        return [perplexity(model, ids).ppl for ids in evals]

    plain = ppl(rtn(copy.deepcopy(dense)))
    assert plain == pytest.approx(LLMC_RTN_W4, rel=1e-3)
    learned = copy.deepcopy(dense)
    report = apply_spinquant(learned, SpinQuantModifier(rotations=["R1", "R2"], learnable=True, r1_init="identity",
                                                        learning_rate=0.02, steps=15), batches[:4], quant_args=w4)
    assert report["learned"]["final_loss"] < report["learned"]["initial_loss"], report["learned"]

    plain_a4 = rtn(copy.deepcopy(dense))
    qm.attach_activation_quantization(plain_a4, a4)
    rotated_a4 = copy.deepcopy(dense)
    apply_spinquant(rotated_a4, SpinQuantModifier(rotations=["R1", "R2", "R3", "R4"]))
    qm.attach_activation_quantization(rtn(rotated_a4), a4)
    without, with_ = ppl(plain_a4), ppl(rotated_a4)
    assert with_[0] < without[0] and with_[1] < without[1], (with_, without)


def test_gptq_modifier_event_lifecycle_quantizes_with_each_modules_own_hessian():
    """Driven by llm-compressor's events instead of the pipeline: calibrate on one dense forward, then solve."""
    from service.algorithms.gptq import gptq_quantize
    from service.algorithms.hessian import HessianAccumulator
    from service.recipes.lifecycle import Event, EventType, State
    from tests.tiny_models import make_model

    model = make_model("llama")
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    target = model.model.layers[1].mlp.down_proj
    seen = []
    probe = target.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    w0 = target.weight.detach().clone()
    modifier = qm.GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4,
                                                                                      "strategy": "channel"}}})
    state = State(model=model)
    modifier.initialize(state)
    modifier.update_event(state, Event(type_=EventType.CALIBRATION_EPOCH_START))
    with torch.no_grad():
        model(ids)
    probe.remove()
    modifier.update_event(state, Event(type_=EventType.CALIBRATION_EPOCH_END))
    modifier.finalize(state)
    acc = HessianAccumulator(w0.shape[1])
    acc.add(seen[0])
    expected = gptq_quantize(w0, acc.hessian, QuantArgs(4, True, "channel"))
    assert torch.equal(target.weight, expected.q_weight) and torch.equal(target.weight_scale, expected.scale)
    assert len(modifier.reports) == 3 * 7 and not modifier._hooks
