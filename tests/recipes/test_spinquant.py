"""service/recipes/spinquant.py: SpinQuant rotations preserve the model exactly; mappings, errors, learned rotations."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as t

from service.algorithms import rotations as rot
from service.engine.perplexity import perplexity
from service.engine.text_data import load_tokenizer, read_texts, tokenize
from service.recipes import online_rotations as online
from service.recipes import spinquant as sq
from service.recipes.recipe import RecipeError, load_recipe
from tests.fixture_paths import STORIES, WIKI_VALID
from tests.fixture_paths import TINYSTORIES

ALL = ["R1", "R2", "R3", "R4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories():
    tok = load_tokenizer(STORIES)
    ids = tokenize(tok, read_texts(TINYSTORIES))
    model = t.AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    return model, ids[:256][None], ids[:2048]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def build(config, seed=0):
    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm scales and biases, so norm fusion and bias rotation are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


TINY = {
    # power-of-two sizes
    "llama-pow2": lambda: t.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    # hidden 48 = 12 * 4, head_dim 12, intermediate 80 = 20 * 4: Hadamard orders that are not powers of two
    "llama-non-pow2": lambda: t.LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=80,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, tie_word_embeddings=True),
    "mistral": lambda: t.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       sliding_window=16),
    "qwen2": lambda: t.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen3": lambda: t.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128),
}


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("rotations", [["R1", "R2"], ALL])
@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard", "random-matrix"])
def test_stories260k_function_unchanged(stories, rotations, kind):
    dense, ids, ppl_ids = stories
    model = copy.deepcopy(dense)
    report = sq.apply_spinquant(model, sq.SpinQuantModifier(rotations=rotations, transform_type=kind, seed=7))
    assert report["untied"] and report["norms_fused"] == 2 * 5 + 1
    # the weights really moved (an identity "rotation" would pass the exactness check trivially)
    moved = model.model.layers[0].self_attn.q_proj.weight - dense.model.layers[0].self_attn.q_proj.weight
    assert moved.abs().max() > 0.01
    if "R4" in rotations:
        assert set(report["online_transforms"]) == {"R3", "R4"}  # intermediate 172 = Hadamard order 43 * 4
        assert model.config._attn_implementation.startswith("llmpress_r3:")
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3
    before, after = perplexity(dense, ppl_ids, seq_len=256).ppl, perplexity(model, ppl_ids, seq_len=256).ppl
    assert after == pytest.approx(before, rel=5e-5), (before, after)  # four significant digits


@pytest.mark.parametrize("arch", list(TINY))
def test_random_models_function_unchanged(arch):
    dense = build(TINY[arch]())
    ids = torch.randint(0, 512, (2, 64))
    for rotations in (["R1", "R2"], ALL):
        model = copy.deepcopy(dense)
        sq.apply_spinquant(model, sq.SpinQuantModifier(rotations=rotations, transform_type="random-hadamard"))
        assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3, (arch, rotations)


def test_block_size_is_block_diagonal_and_exact():
    dense = build(TINY["llama-pow2"]())
    ids = torch.randint(0, 512, (2, 32))
    model = copy.deepcopy(dense)
    modifier = sq.SpinQuantModifier(rotations=ALL, transform_type="random-hadamard", transform_block_size=16)
    plan = sq.spinquant_plan(model.config, modifier, *sq.infer_mappings(model))
    blocks = rot.dense(plan.r1).reshape(4, 16, 4, 16)
    for i in range(4):
        for j in range(4):
            assert torch.equal(blocks[i, :, j], blocks[0, :, 0]) if i == j else not blocks[i, :, j].any()
    assert plan.r4[0].block == 16
    sq.apply_spinquant(model, modifier)
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3
    with pytest.raises(ValueError, match="transform_block_size: 24 must divide hidden_size"):
        sq.apply_spinquant(copy.deepcopy(dense), sq.SpinQuantModifier(transform_block_size=24))


def test_float32_precision_is_also_close():
    dense = build(TINY["llama-pow2"]())
    ids = torch.randint(0, 512, (2, 32))
    model = copy.deepcopy(dense)
    sq.apply_spinquant(model, sq.SpinQuantModifier(rotations=ALL, precision="float32"))
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3


def test_random_hadamard_deterministic_by_seed_and_randomize_per_layer():
    dense = build(TINY["llama-pow2"]())

    def weights(**kw):
        model = copy.deepcopy(dense)
        sq.apply_spinquant(model, sq.SpinQuantModifier(transform_type="random-hadamard", **kw))
        return model.state_dict()

    a, b, c = weights(seed=1), weights(seed=1), weights(seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    plan = sq.spinquant_plan(dense.config, sq.SpinQuantModifier(transform_type="random-hadamard", randomize=True),
                             *sq.infer_mappings(dense))
    assert not torch.equal(rot.dense(plan.r2[0]), rot.dense(plan.r2[1]))
    plan = sq.spinquant_plan(dense.config, sq.SpinQuantModifier(transform_type="random-matrix"),
                             *sq.infer_mappings(dense))
    assert rot_error(plan.r1) < 1e-12 and rot_error(plan.r2[0]) < 1e-12 and torch.equal(plan.r2[0], plan.r2[1])


def rot_error(r: torch.Tensor) -> float:
    return float((r.T @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())


# ------------------------------------------------------------------------------------- mappings and errors


def test_unsupported_architecture_is_refused():
    from tests.tiny_models import make_model

    with pytest.raises(ValueError, match="GPT2LMHeadModel; supported: LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        sq.apply_spinquant(make_model("gpt2"), sq.SpinQuantModifier())


def test_explicit_regex_mappings():
    dense = build(TINY["llama-pow2"]())
    ids = torch.randint(0, 512, (2, 32))
    mapping = sq.SpinQuantMapping(
        embedding="model.embed_tokens", attn=r"re:model\.layers\.\d+\.self_attn$",
        attn_q=r"re:.*\.q_proj$", attn_k="k_proj", attn_v="self_attn.v_proj", attn_o=r"re:.*o_proj",
        mlp_in=[r"re:.*mlp\.(gate|up)_proj$"], mlp_out="down_proj", lm_head=r"re:^lm_head$",
    )
    norms = [
        sq.NormMapping(norm="input_layernorm", linears=[r"re:.*self_attn\.[qkv]_proj$"]),
        sq.NormMapping(norm="post_attention_layernorm", linears=[r"re:.*mlp\.(gate|up)_proj$"]),
        sq.NormMapping(norm=r"re:^model\.norm$", linears="lm_head"),
    ]
    model = copy.deepcopy(dense)
    modifier = sq.SpinQuantModifier(rotations=ALL, mappings=mapping, norm_mappings=norms)
    sq.apply_spinquant(model, modifier)
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3
    bad = mapping.model_copy(update={"attn_q": r"re:.*query$"})
    with pytest.raises(ValueError, match=r"mappings.attn_q: 're:.\*query\$' matches 0 modules"):
        sq.apply_spinquant(copy.deepcopy(dense), sq.SpinQuantModifier(mappings=bad, norm_mappings=norms))


def test_layernorm_models_are_refused():
    dense = build(TINY["llama-pow2"]())
    dense.model.norm = torch.nn.LayerNorm(64)
    with pytest.raises(ValueError, match="model.norm is a LayerNorm; only RMSNorm"):
        sq.apply_spinquant(dense, sq.SpinQuantModifier())


def test_recipe_loading_and_errors_name_field():
    recipe = load_recipe(
        "transform_stage:\n  transform_modifiers:\n    SpinQuantModifier:\n"
        "      rotations: [r1, R2, R4]\n      transform_type: random-hadamard\n      seed: 3\n"
    )
    (modifier,) = recipe.modifiers()
    assert isinstance(modifier, sq.SpinQuantModifier) and modifier.rotations == ["R1", "R2", "R4"]
    with pytest.raises(RecipeError, match="transform_type") as err:
        load_recipe([{"SpinQuantModifier": {"transform_type": "givens"}}])
    assert "hadamard" in str(err.value) and "random-matrix" in str(err.value)
    with pytest.raises(RecipeError, match="rotations"):
        load_recipe([{"SpinQuantModifier": {"rotations": ["R5"]}}])
    with pytest.raises(RecipeError, match="transform_block_size"):
        load_recipe([{"SpinQuantModifier": {"transform_block_size": 0}}])


# --------------------------------------------------------------------------------------- save and reload


def test_online_transforms_survive_save_and_reload(stories, tmp_path):
    dense, ids, _ = stories
    model = copy.deepcopy(dense)
    modifier = sq.SpinQuantModifier(rotations=ALL, transform_type="random-hadamard")
    report = modifier.prepare_model(model)
    description = json.loads(json.dumps(report["online_transforms"]))  # what the checkpoint records
    assert description == online.online_transforms_description(model)
    model.save_pretrained(tmp_path)
    reloaded = t.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert (logits(reloaded, ids) - logits(dense, ids)).abs().max() > 1.0  # R4's fused inverse alone is wrong
    online.attach_online_transforms(reloaded, description)
    assert (logits(reloaded, ids) - logits(dense, ids)).abs().max() <= 1e-3


# ----------------------------------------------------------------------------------------------- learning


def test_cayley_step_stays_orthogonal_and_descends():
    torch.manual_seed(0)
    target = rot.orthogonal_matrix("random-matrix", 16, seed=1)
    x = rot.orthogonal_matrix("hadamard", 16)
    buf = torch.zeros_like(x)

    def f(m):
        return float(((m - target) ** 2).sum())

    start = f(x)
    for _ in range(30):
        grad = 2 * (x - target)
        x, buf = sq.cayley_sgd_step(x, grad, buf, lr=0.05, momentum=0.5)
    assert rot_error(x) < 1e-12
    assert f(x) < 0.5 * start


def test_learned_rotations_lower_quantized_loss_and_stay_exact(stories):
    from service.algorithms.quantization import QuantArgs
    from service.engine.calibration_data import calibration_tokens

    dense, ids, _ = stories
    tok = load_tokenizer(STORIES)
    batches = [{"input_ids": calibration_tokens(WIKI_VALID, tok, 2, 256)}]
    args = QuantArgs(num_bits=4)
    model = copy.deepcopy(dense)
    modifier = sq.SpinQuantModifier(learnable=True, steps=6, learning_rate=0.005, quantization={"num_bits": 4})
    plan = sq.spinquant_plan(model.config, modifier, *sq.infer_mappings(model))
    learned = sq.learn_rotations(model, plan, batches, args, steps=6, learning_rate=0.005)
    assert learned["final_loss"] < learned["initial_loss"] - 1e-3, learned
    assert rot_error(plan.r1) < 1e-5 and all(rot_error(r) < 1e-5 for r in plan.r2)
    initial = sq.spinquant_plan(dense.config, modifier, *sq.infer_mappings(dense)).r1
    assert not torch.allclose(plan.r1, rot.dense(initial))

    # the full path: learned rotations fused into the (unquantized) model still give the same function
    model = copy.deepcopy(dense)
    report = sq.apply_spinquant(model, modifier, batches)
    assert len(report["learned"]["losses"]) == 6
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3
    with pytest.raises(ValueError, match="dataset: .*learnable"):
        sq.apply_spinquant(copy.deepcopy(dense), modifier)


def test_modifier_through_oneshot_rotates_exactly():
    """oneshot calls the modifier's ``prepare_model`` before its stage (the stage itself has no targets)."""
    from service.engine.oneshot import oneshot

    dense = build(TINY["qwen2"]())
    ids = torch.randint(0, 512, (1, 32))
    model = copy.deepcopy(dense)
    report = oneshot(model, [sq.SpinQuantModifier(rotations=ALL)])
    assert report["totals"]["params_targeted"] == 0 and len(report["transforms"]) == 1
    assert not torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3


def test_learning_with_r4_in_the_loop_matches_the_rotated_quantized_model(stories):
    """The loss learn_rotations optimises is the loss of the model apply_spinquant then builds, quantized: with
    zero steps and R4 planned, the learning loss equals the loss of the rotated model with RTN weights, and not
    that of the model without R4. (Equal up to RTN ties: weights equal to an ulp can still round a row's
    largest entry differently, which moves this 256-token loss by ~1.5e-3; R4 moves it by ~2e-2.)"""
    from service.algorithms.quantization import QuantArgs, fake_quantize

    dense, ids, _ = stories
    args = QuantArgs(num_bits=4)

    def learned_and_actual(rotations, objective="ce"):
        model = copy.deepcopy(dense)
        modifier = sq.SpinQuantModifier(rotations=rotations, learnable=True, steps=0, objective=objective)
        report = sq.apply_spinquant(model, modifier, [{"input_ids": ids}], quant_args=args)
        with torch.no_grad():
            for layer in model.model.layers:
                for module in layer.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.copy_(fake_quantize(module.weight, args))
            out = model(ids, labels=ids)
            if objective == "kl":  # KL(dense || quantized), mean over tokens
                dense_lp = torch.log_softmax(logits(dense, ids), -1)[0]
                return report, (dense_lp.exp() * (dense_lp - torch.log_softmax(out.logits, -1)[0])).sum(-1).mean().item()
            return report, out.loss.item()

    report, with_r4 = learned_and_actual(["R1", "R2", "R4"])
    _, without_r4 = learned_and_actual(["R1", "R2"])
    assert report["learned"]["initial_loss"] == pytest.approx(with_r4, abs=4e-3)
    assert abs(with_r4 - without_r4) > 1e-2
    assert set(report["online_transforms"]) == {"R4"}  # learning's temporary hooks are gone, the final ones on
    report, kl = learned_and_actual(["R1", "R2", "R4"], "kl")  # the default objective measures the same model
    assert report["learned"]["objective"] == "kl" and report["learned"]["initial_loss"] == pytest.approx(kl, rel=0.05)


def test_without_r1_norms_and_embeddings_are_left_alone():
    """Only R1 needs the norms fused (and the head untied); R2/R4 alone leave them, keeping W4 quality."""
    dense = build(TINY["llama-non-pow2"]())  # tied embeddings
    ids = torch.randint(0, 512, (2, 32))
    model = copy.deepcopy(dense)
    report = sq.apply_spinquant(model, sq.SpinQuantModifier(rotations=["R2", "R3", "R4"]))
    assert report["norms_fused"] == 0 and not report["untied"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.layers[0].input_layernorm.weight, dense.model.layers[0].input_layernorm.weight)
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3


# ------------------------------------------------------------------------------ learned per-channel scalings


def random_scales(plan, sigma=0.3, seed=0):
    """Log-scales in the plan's layout: s = exp(sigma * N(0, 1)), far from 1 so a wrong fusion shows."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"attn": plan.hidden, "mlp": plan.hidden, "ud": plan.intermediate,
             "vo": plan.num_kv_heads * plan.head_dim}
    return {k: sigma * torch.randn(plan.num_layers, n, generator=g, dtype=torch.float64) for k, n in sizes.items()}


def rotate_with(model, rotations, scales=True, kind="random-hadamard"):
    """apply_spinquant's path with the plan's scales set (random) instead of learned; returns the plan."""
    from service.recipes.targets import find_blocks

    plan = sq.spinquant_plan(model.config, sq.SpinQuantModifier(rotations=rotations, transform_type=kind),
                             *sq.infer_mappings(model))
    plan.scales = random_scales(plan) if scales else None
    blocks = find_blocks(model, None)
    sq.rotate_outside(model, plan, blocks)
    for index, (name, block) in enumerate(blocks):
        sq.rotate_block(block, name, index, plan)
    sq.finish_online(model, plan)
    return plan


@pytest.mark.parametrize("which", ["stories260k", "qwen2", "llama-pow2"])
def test_scales_fused_keep_the_function(stories, which):
    """Random scalings (exp(0.3 N), so up to ~3x either way) with R1-R4 online: still the dense function."""
    if which == "stories260k":
        dense, ids, _ = stories
    else:  # GQA (4 query heads on 2 KV heads); Qwen2's q/k/v biases exercise v's bias / u
        dense, ids = build(TINY[which]()), torch.randint(0, 512, (2, 64))
    for rotations in (["R1", "R2"], ALL):
        model = copy.deepcopy(dense)
        rotate_with(model, rotations)
        assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(1))
        assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3, (which, rotations)


def test_scales_are_fused_where_specified():
    """Against the same rotations without scales: norm weight 1/s, q/k/v and gate/up columns * s, up rows / t,
    down columns * t, v rows (and bias) / u, o columns * u repeated over each GQA group."""
    dense = build(TINY["qwen2"]())
    plain, scaled = copy.deepcopy(dense), copy.deepcopy(dense)
    rotate_with(plain, ["R1", "R2"], scales=False, kind="hadamard")
    plan = rotate_with(scaled, ["R1", "R2"], kind="hadamard")
    for i, (a, b) in enumerate(zip(plain.model.layers, scaled.model.layers)):
        s_a, s_m, t_, u = (plan.scales[k][i].exp().float() for k in ("attn", "mlp", "ud", "vo"))
        u_o = u.view(2, 1, 16).expand(-1, 2, -1).reshape(-1)  # 4 heads of 16 on 2 KV heads

        def close(x, y):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)

        close(b.input_layernorm.weight, 1 / s_a)
        close(b.post_attention_layernorm.weight, 1 / s_m)
        close(b.self_attn.q_proj.weight, a.self_attn.q_proj.weight * s_a)
        close(b.self_attn.k_proj.weight, a.self_attn.k_proj.weight * s_a)
        close(b.self_attn.v_proj.weight, a.self_attn.v_proj.weight * s_a / u[:, None])
        close(b.self_attn.v_proj.bias, a.self_attn.v_proj.bias / u)
        close(b.self_attn.k_proj.bias, a.self_attn.k_proj.bias)
        close(b.self_attn.o_proj.weight, a.self_attn.o_proj.weight * u_o)
        close(b.mlp.gate_proj.weight, a.mlp.gate_proj.weight * s_m)
        close(b.mlp.up_proj.weight, a.mlp.up_proj.weight * s_m / t_[:, None])
        close(b.mlp.down_proj.weight, a.mlp.down_proj.weight * t_)
    assert torch.equal(plain.model.layers[0].input_layernorm.weight, torch.ones(64))  # no scales: norms stay fused
    model = copy.deepcopy(dense)  # learnable=False plans no scales
    sq.apply_spinquant(model, sq.SpinQuantModifier(rotations=ALL))
    assert all(torch.equal(layer.post_attention_layernorm.weight, torch.ones(64)) for layer in model.model.layers)


@pytest.mark.parametrize("args", [{"num_bits": 4}, {"num_bits": 4, "symmetric": False},
                                  {"num_bits": 4, "strategy": "group", "group_size": 16},
                                  {"num_bits": 8, "strategy": "tensor"}])
def test_fake_quantize_scale_grad_is_bit_identical_and_differentiates_the_scale(args):
    from service.algorithms.quantization import QuantArgs, fake_quantize, quantization_params

    args = QuantArgs(**args)
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.rand(32, 1)
    w[3] = 0  # an all-zero row: eps scale
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = w.to(dtype).requires_grad_(True)
        assert torch.equal(fake_quantize(x, args, scale_grad=True), fake_quantize(w.to(dtype), args))
    # a row scaling e^theta scales the symmetric RTN output by e^theta exactly, so d out / d theta = out; the
    # default STE gives w instead (no gradient through max|w|), scale_grad the true derivative
    if args.symmetric and args.strategy == "channel":
        c = torch.randn(32, 64)
        grads = {}
        for flag in (False, True):
            theta = torch.zeros(32, 1, requires_grad=True)
            out = fake_quantize(w * theta.exp(), args, scale_grad=flag)
            (out * c).sum().backward()
            grads[flag] = theta.grad.flatten()
        truth = (fake_quantize(w, args) * c).sum(-1)
        torch.testing.assert_close(grads[True], truth, rtol=1e-5, atol=1e-5)
        assert (grads[False] - truth).abs().max() > 1e-2
    with pytest.raises(ValueError, match="scale_grad"):
        fake_quantize(w, args, *quantization_params(w, args), scale_grad=True)


def test_learned_scales_lower_the_kl_and_stay_exact(stories):
    from service.algorithms.quantization import QuantArgs
    from service.engine.calibration_data import calibration_tokens

    dense, ids, _ = stories
    tok = load_tokenizer(STORIES)
    batches = [{"input_ids": calibration_tokens(WIKI_VALID, tok, 2, 256)}]
    model = copy.deepcopy(dense)
    modifier = sq.SpinQuantModifier(learnable=True, steps=8)
    assert modifier.learn_scales and modifier.objective == "kl"
    plan = sq.spinquant_plan(model.config, modifier, *sq.infer_mappings(model))
    learned = sq.learn_rotations(model, plan, batches, QuantArgs(num_bits=4), steps=8, learning_rate=0.005,
                                 learn_scales=True, objective="kl")
    assert learned["final_loss"] < 0.95 * learned["initial_loss"], learned
    assert rot_error(plan.r1) < 1e-10 and all(rot_error(r) < 1e-10 for r in plan.r2)
    assert set(plan.scales) == {"attn", "mlp", "ud", "vo"}
    assert plan.scales["ud"].shape == (5, 172) and plan.scales["vo"].shape == (5, 32)  # 4 KV heads of 8
    assert all(v.dtype == torch.float64 and v.abs().max() > 1e-3 for v in plan.scales.values())

    model = copy.deepcopy(dense)  # the full path, R1-R4: learned scales fused, the same function
    report = sq.apply_spinquant(model, modifier.model_copy(update={"rotations": ALL}), batches)
    assert report["learned"]["objective"] == "kl" and len(report["learned"]["losses"]) == 8
    assert not torch.allclose(model.model.layers[0].post_attention_layernorm.weight, torch.ones(1))
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3


def test_r1_init_identity_starts_from_the_unrotated_model_and_learns_from_there(stories):
    from service.algorithms.quantization import QuantArgs
    from service.engine.calibration_data import calibration_tokens

    dense, ids, _ = stories
    with pytest.raises(RecipeError, match="r1_init"):
        load_recipe([{"SpinQuantModifier": {"r1_init": "identity"}}])  # not learnable: R1 would stay the identity
    with pytest.raises(RecipeError, match="r1_init"):
        load_recipe([{"SpinQuantModifier": {"learnable": True, "r1_init": "eye"}}])
    tok = load_tokenizer(STORIES)
    batches = [{"input_ids": calibration_tokens(WIKI_VALID, tok, 2, 256)}]
    modifier = sq.SpinQuantModifier(rotations=["R1"], learnable=True, steps=0, r1_init="identity")
    model = copy.deepcopy(dense)
    report = sq.apply_spinquant(model, modifier, batches, quant_args=QuantArgs(num_bits=4))
    # Zero steps: every weight is back where it was (to float rounding; the norm signs move into the readers)
    for layer, original in zip(model.model.layers, dense.model.layers):
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g = original.get_submodule(norm).weight
            assert torch.allclose(layer.get_submodule(norm).weight, g.abs(), rtol=1e-6, atol=0)
            for reader in readers:
                expected = original.get_submodule(reader).weight * g.sign()
                assert torch.allclose(layer.get_submodule(reader).weight, expected, rtol=1e-6, atol=1e-9)
    plain = copy.deepcopy(dense)  # so the learning starts at the unrotated W4 model's loss
    from service.algorithms.quantization import fake_quantize

    with torch.no_grad():
        for module in plain.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, QuantArgs(num_bits=4)))
        ref = torch.log_softmax(dense(**batches[0]).logits, -1).flatten(0, -2)
        got = torch.log_softmax(plain(**batches[0]).logits, -1).flatten(0, -2)
        plain_kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean").item()
    assert report["learned"]["initial_loss"] == pytest.approx(plain_kl, rel=0.02)

    model = copy.deepcopy(dense)
    learned = sq.apply_spinquant(model, modifier.model_copy(update={"rotations": ["R1", "R2"], "steps": 8,
                                                                    "learning_rate": 0.02}),
                                 batches, quant_args=QuantArgs(num_bits=4))["learned"]
    assert learned["final_loss"] < 0.9 * learned["initial_loss"], learned
    assert (logits(model, ids) - logits(dense, ids)).abs().max() <= 1e-3
