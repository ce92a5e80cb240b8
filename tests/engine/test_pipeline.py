"""The sequential pipeline against slow references, on tiny random models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

from service.algorithms.hessian import HessianAccumulator
from service.algorithms.sparsegpt import sparsegpt_prune
from service.engine.oneshot import oneshot, token_batches
from service.engine.pipeline import capture, module_tasks
from service.recipes import pruning_modifiers as pm
from service.recipes.targets import find_blocks
from service.recipes.targets import compressible_modules, weight_matrix
from tests.tiny_models import ARCHITECTURES, make_model


def batches_for(seed=0, n=6, seq=24, vocab=512, batch=2):
    g = torch.Generator().manual_seed(seed)
    return token_batches(torch.randint(0, vocab, (n, seq), generator=g), batch)


def zeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    return (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_family_prunes_2_of_4_in_its_blocks_only(arch):
    model = make_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters()}
    recipe = pm.SparseGPTModifier(mask_structure="2:4")
    report = oneshot(model, [recipe], batches=batches_for(), device="cpu")
    blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    pruned = set()
    for name, block in blocks:
        for module_name, module in compressible_modules(block, name, ["Linear"], []):
            w = weight_matrix(module)
            assert (zeros_per_group(w, 4) >= 2).all(), module_name
            assert report["modules"][module_name]["sparsity"] >= 0.5
            pruned.add(module_name + ".weight")
    assert pruned and set(report["modules"]) == {n.removesuffix(".weight") for n in pruned}
    for name, p in model.named_parameters():  # embeddings, norms, heads untouched
        if name not in pruned and not any(name.startswith(b + ".") and name.endswith("weight") and
                                          name.removesuffix(".weight") in report["modules"] for b, _ in blocks):
            assert torch.equal(p, before[name]), name
    out = model(input_ids=batches_for()[0]["input_ids"])
    assert torch.isfinite(out.logits).all()


def _slow_true_sequential(model, batches, sparsity, structure):
    """Reference for the one-pass pipeline: for each target module in execution order, rerun the whole model on
    every batch (with the modules before it already pruned), take its inputs, and prune it."""
    blocks = find_blocks(model)
    order = []
    hooks = []
    for name, block in blocks:
        for module_name, module in compressible_modules(block, name, ["Linear"], []):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, n=module_name: order.append(n) if n not in order else None))
    with torch.no_grad():
        model(**batches[0])
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    for name in order:
        module = modules[name]
        acc = HessianAccumulator(module.in_features)
        handle = module.register_forward_pre_hook(lambda mod, args: acc.add(args[0]))
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        handle.remove()
        result = sparsegpt_prune(module.weight.detach(), acc.hessian, sparsity, mask_structure=structure)
        with torch.no_grad():
            module.weight.copy_(result.weight)
    return order


@pytest.mark.parametrize("structure,sparsity", [((2, 4), 0.5), ((0, 0), 0.6)])
def test_one_pass_equals_rerunning_the_model_for_every_module(structure, sparsity):
    batches = batches_for(seed=1)
    fast, slow = make_model("llama"), make_model("llama")
    modifier = pm.SparseGPTModifier(sparsity=sparsity, mask_structure=f"{structure[0]}:{structure[1]}")
    oneshot(fast, [modifier], batches=batches, device="cpu", pipeline="one_pass")
    order = _slow_true_sequential(slow, batches, sparsity, structure)
    assert len(order) == 3 * 7
    for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_two_pass_calibrates_each_block_on_its_dense_self():
    """Two-pass: every module's Hessian comes from the block before any of its modules is pruned."""
    batches = batches_for(seed=2)
    fast, slow = make_model("llama"), make_model("llama")
    oneshot(fast, [pm.SparseGPTModifier(sparsity=0.5)], batches=batches, device="cpu", pipeline="two_pass")
    blocks = find_blocks(slow)
    hidden, calls = capture(slow, blocks, batches, torch.device("cpu"))
    with torch.no_grad():
        for (name, block), block_calls in zip(blocks, calls):
            targets = compressible_modules(block, name, ["Linear"], [])
            accs = {n: HessianAccumulator(m.in_features) for n, m in targets}
            handles = [m.register_forward_pre_hook(lambda mod, args, a=accs[n]: a.add(args[0])) for n, m in targets]
            for h, call in zip(hidden, block_calls):
                call(block, h)
            for h in handles:
                h.remove()
            for n, m in targets:
                m.weight.copy_(sparsegpt_prune(m.weight, accs[n].hessian, 0.5).weight)
            hidden = [call(block, h) for h, call in zip(hidden, block_calls)]
    for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_inputs_share_one_hessian():
    model = make_model("llama")
    blocks = find_blocks(model)
    hidden, calls = capture(model, blocks, batches_for(), torch.device("cpu"))
    name, block = blocks[0]
    modifier = pm.SparseGPTModifier(sparsity=0.5)
    tasks = module_tasks(block, name, 0, [modifier])
    from service.engine.pipeline import BlockStatistics, _two_pass_calibrate

    stats = BlockStatistics(torch.device("cpu"))
    _two_pass_calibrate(block, hidden, calls[0], tasks, stats)
    groups = {}
    for task_name, group in stats.group_of.items():
        groups.setdefault(group, []).append(task_name.rsplit(".", 1)[-1])
    assert sorted(map(sorted, groups.values())) == [["down_proj"], ["gate_proj", "up_proj"],
                                                     ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    assert len(stats.accumulators) == 4


def test_sparsity_zero_leaves_the_model_unchanged():
    model = make_model("llama")
    before = copy.deepcopy(model.state_dict())
    oneshot(model, [pm.SparseGPTModifier(sparsity=0.0)], batches=batches_for(), device="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_targets_and_ignore_select_modules():
    model = make_model("llama")
    modifier = pm.SparseGPTModifier(sparsity=0.5, targets=["re:.*self_attn.*"], ignore=["re:.*layers\\.1\\..*", "v_proj"])
    report = oneshot(model, [modifier], batches=batches_for(), device="cpu")
    names = set(report["modules"])
    assert names and all("self_attn" in n and ".layers.1." not in n and "v_proj" not in n for n in names)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.2.self_attn.o_proj" in names


def test_per_layer_sparsity_list_and_mapping():
    model = make_model("llama")
    report = oneshot(model, [pm.WandaPruningModifier(sparsity=[0.2, 0.5, 0.7])], batches=batches_for(), device="cpu")
    # Wanda prunes int(sparsity * columns) per row, so a layer can fall short by under one weight per row.
    assert [layer["sparsity"] for layer in report["layers"]] == pytest.approx([0.2, 0.5, 0.7], abs=0.02)
    with pytest.raises(ValueError, match="lists 2 values but the model has 3 blocks"):
        oneshot(make_model("llama"), [pm.SparseGPTModifier(sparsity=[0.2, 0.5])], batches=batches_for(), device="cpu")
    report = oneshot(make_model("llama"), [pm.MagnitudePruningModifier(sparsity={"model.layers.1": 0.5, "re:.*2$": 0.25})],
                     device="cpu")
    assert [round(layer["sparsity"], 2) for layer in report["layers"]] == [0.0, 0.5, 0.25]


def test_magnitude_needs_no_data_and_wanda_does():
    report = oneshot(make_model("llama"), [pm.MagnitudePruningModifier(sparsity=0.5)], device="cpu")
    assert report["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="needs calibration data"):
        oneshot(make_model("llama"), [pm.WandaPruningModifier(sparsity=0.5)], device="cpu")


def test_owl_spreads_sparsity_with_the_target_mean():
    model = make_model("llama")
    modifier = pm.SparseGPTModifier(sparsity=0.6, sparsity_profile="owl", owl_lmbda=0.1)
    report = oneshot(model, [modifier], batches=batches_for(), device="cpu")
    layers = [layer["sparsity"] for layer in report["layers"]]
    assert sum(layers) / len(layers) == pytest.approx(0.6, abs=2e-3)
    # OWL's rule spreads the layers over a band 2 * lmbda wide around the target (not always centred on it).
    assert 0.05 < max(layers) - min(layers) <= 0.2 + 1e-3


def test_lifecycle_driven_modifier_matches_the_two_pass_pipeline():
    """llm-compressor's event flow (hooks calibrate, SEQUENTIAL_EPOCH_END compresses) gives the two-pass result
    when the caller feeds each block its calibration in order, as llm-compressor's sequential pipeline does."""
    from service.recipes.lifecycle import Event, EventType, State

    batches = batches_for(seed=3)
    expected = make_model("llama")
    oneshot(expected, [pm.SparseGPTModifier(sparsity=0.5)], batches=batches, device="cpu", pipeline="two_pass")

    model = make_model("llama")
    modifier = pm.SparseGPTModifier(sparsity=0.5)
    state = State(model=model)
    modifier.initialize(state)
    modifier.update_event(state, Event(type_=EventType.CALIBRATION_EPOCH_START))
    blocks = find_blocks(model)
    hidden, calls = capture(model, blocks, batches, torch.device("cpu"))
    with torch.no_grad():
        for (name, block), block_calls in zip(blocks, calls):
            for h, call in zip(hidden, block_calls):
                call(block, h)
            modifier.update_event(state, Event(type_=EventType.SEQUENTIAL_EPOCH_END))
            hidden = [call(block, h) for h, call in zip(hidden, block_calls)]
    modifier.update_event(state, Event(type_=EventType.CALIBRATION_EPOCH_END))
    modifier.finalize(state)
    for (name, p), (_, q) in zip(model.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert not any(m._forward_hooks for m in model.modules())


def test_a_module_claimed_twice_is_an_error():
    with pytest.raises(Exception, match="targeted by both"):
        oneshot(make_model("llama"), [pm.SparseGPTModifier(sparsity=0.5), pm.WandaPruningModifier(sparsity=0.5)],
                batches=batches_for(), device="cpu")


def test_sequential_targets_and_offloaded_hessians_give_the_same_result():
    batches = batches_for(seed=4)
    expected, named, offloaded = make_model("llama"), make_model("llama"), make_model("llama")
    oneshot(expected, [pm.SparseGPTModifier(sparsity=0.5)], batches=batches, device="cpu")
    oneshot(named, [pm.SparseGPTModifier(sparsity=0.5, sequential_targets=["LlamaDecoderLayer"])], batches=batches,
            device="cpu")
    oneshot(offloaded, [pm.SparseGPTModifier(sparsity=0.5, offload_hessians=True)], batches=batches, device="cpu")
    for (name, p), (_, q), (_, r) in zip(expected.named_parameters(), named.named_parameters(),
                                         offloaded.named_parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), name
    with pytest.raises(Exception, match="match no module"):
        oneshot(make_model("llama"), [pm.SparseGPTModifier(sparsity=0.5, sequential_targets=["NoSuchLayer"])],
                batches=batches, device="cpu")
