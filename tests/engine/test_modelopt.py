"""The ModelOpt-style API (service.engine.modelopt) on tiny random Llama and GPT-2 models built here."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from service.engine import modelopt as mto
from service.engine.oneshot import oneshot

VOCAB = 128


def llama(seed=0, hidden=64, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(config)


def gpt2(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0,
                        eos_token_id=1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(config)


BUILDERS = {"llama": llama, "gpt2": gpt2}
LAYERS_PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h."}
MODULES_PER_LAYER = {"llama": 7, "gpt2": 4}


def batches(n=3, batch=2, seq=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)} for _ in range(n)]


PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model, ids=PROBE):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def sparse(kind, mode="sparsegpt", **config):
    model = BUILDERS[kind]()
    if mode == "sparsegpt":
        config.setdefault("data_loader", batches())
        config.setdefault("collect_func", lambda batch: batch["input_ids"])
    return mto.sparsify(model, mode, config=config)


def as_out_in(module):
    """The weight as [out, in], written out here rather than taken from service.recipes.targets."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def layer_modules(model, kind):
    return {name: m for name, m in model.named_modules()
            if name.startswith(LAYERS_PREFIX[kind]) and isinstance(m, (nn.Linear, Conv1D))}


def assert_2_of_4(weight):
    groups = (weight.detach() == 0).reshape(weight.shape[0], -1, 4).sum(-1)
    assert torch.equal(groups, torch.full_like(groups, 2)), groups.unique()


# ------------------------------------------------------------------------------------------------------ sparsify


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["sparsegpt", "sparse_magnitude"])
def test_sparsify_prunes_two_of_every_four_in_the_decoder_layers(kind, mode):
    dense = BUILDERS[kind]()
    before = logits(dense).clone()
    dense.train()
    model = mto.sparsify(dense, mode, config={"data_loader": batches()} if mode == "sparsegpt" else {})
    assert model is dense and model.training  # calibrated in eval mode, handed back in the mode it came in

    modules = layer_modules(model, kind)
    assert len(modules) == 2 * MODULES_PER_LAYER[kind]
    for name, module in modules.items():
        assert_2_of_4(as_out_in(module))
    assert set(mto.masks(model)) == set(modules)
    for name, mask in mto.masks(model).items():
        assert mask.dtype == torch.bool and mask.device.type == "cpu"
        assert torch.equal(mask, as_out_in(modules[name]).detach() != 0)
    assert (model.lm_head.weight != 0).all()  # the head is no decoder layer: dense

    after = logits(model)
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, before)
    assert mto.is_sparse(model)
    meta = model._llmpress_sparsity
    assert meta["mode"] == mode and meta["config"]["mask_structure"] == "2:4"
    assert "data_loader" not in meta["config"] and "collect_func" not in meta["config"]
    json.dumps(meta)
    assert 0.49 < meta["report"]["totals"]["sparsity"] < 0.51
    assert not any("_llmpress" in key for key in model.state_dict())  # masks are non-persistent buffers


def test_sparse_magnitude_reads_no_data():
    def never():
        raise AssertionError("sparse_magnitude iterated the data_loader")
        yield

    model = mto.sparsify(llama(), "sparse_magnitude", config={"data_loader": never()})
    assert mto.is_sparse(model)


def test_calibration_runs_without_dropout():
    quiet = sparse("gpt2")
    noisy = mto.sparsify(gpt2(dropout=0.5), "sparsegpt", config={"data_loader": batches()})
    for name, mask in mto.masks(quiet).items():
        assert torch.equal(mask, mto.masks(noisy)[name]), name
    assert torch.equal(logits(quiet), logits(noisy))


def test_tensor_batches_and_pruning_options_pass_through(monkeypatch):
    calls = []

    def spy(model, recipe, **kwargs):
        calls.append(kwargs)
        return oneshot(model, recipe, **kwargs)

    monkeypatch.setattr(mto, "oneshot", spy)
    loader = [b["input_ids"] for b in batches()]  # plain tensors: the default collect_func makes input_ids
    model = mto.sparsify(llama(), "sparsegpt", config={
        "data_loader": loader, "mask_structure": "0:0", "sparsity": 0.25, "ignore": ["re:.*mlp.*"],
        "pipeline": "one_pass", "block_size": 16, "dampening_frac": 0.05, "device": "cpu",
    })
    assert calls[0]["pipeline"] == "one_pass" and calls[0]["device"] == "cpu" and calls[0]["keep_masks"]
    assert [b["input_ids"] for b in calls[0]["batches"]] == loader
    found = mto.masks(model)
    assert found and all(".self_attn." in name for name in found)
    for name, mask in found.items():
        assert (~mask).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert model._llmpress_sparsity["config"] == {
        "mask_structure": "0:0", "sparsity": 0.25, "ignore": ["re:.*mlp.*"], "pipeline": "one_pass",
        "block_size": 16, "dampening_frac": 0.05, "device": "cpu",
    }
    mto.sparsify(llama(), "sparse_magnitude")
    assert "pipeline" not in calls[1] and calls[1]["batches"] is None  # the engine's default; no data read


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_finetuning_with_adamw_keeps_the_zeros_and_lowers_the_loss(kind):
    model = sparse(kind)
    pruned = {name: ~mask for name, mask in mto.masks(model).items()}
    modules = layer_modules(model, kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = batches(n=1, batch=4, seq=24, seed=3)[0]["input_ids"]
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        for name, module in modules.items():
            grad = module.weight.grad.t() if isinstance(module, Conv1D) else module.weight.grad
            assert (grad[pruned[name]] == 0).all(), name
            assert (grad[~pruned[name]] != 0).any(), name
        optimizer.step()
        for name, module in modules.items():  # checked before any forward could re-apply the mask
            assert (as_out_in(module)[pruned[name]] == 0).all(), name
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_deepcopy_keeps_its_own_masks_active():
    model = sparse("llama")
    twin = copy.deepcopy(model)
    q = twin.model.layers[0].self_attn.q_proj
    mask = q._llmpress_mask
    with torch.no_grad():
        q.weight[~mask] = 1.0
    assert torch.equal(logits(twin), logits(model))
    assert (q.weight[~mask] == 0).all()
    mto.export(twin)
    assert mto.is_sparse(model) and not mto.is_sparse(twin)
    assert len(model.model.layers[0].self_attn.q_proj._forward_pre_hooks) == 1


# ------------------------------------------------------------------------------------------------ save / restore


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_restore_gives_the_same_model_with_active_masks(kind, tmp_path):
    model = sparse(kind)
    expected = logits(model)
    out = mto.save(model, tmp_path / "ckpt")
    assert out == (tmp_path / "ckpt").resolve()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["llmpress_sparsity.json", "masks.safetensors", "weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary sibling left behind
    with safe_open(str(out / "masks.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(mto.masks(model))
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
    meta = json.loads((out / "llmpress_sparsity.json").read_text())
    assert meta["mode"] == "sparsegpt" and meta["config"]["mask_structure"] == "2:4"
    if kind == "gpt2":  # tied embeddings and head: stored once
        with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
            assert "transformer.wte.weight" in f.keys() and "lm_head.weight" not in f.keys()

    fresh = BUILDERS[kind](seed=123)
    assert not torch.equal(logits(fresh), expected)
    restored = mto.restore(fresh, out)
    assert restored is fresh and mto.is_sparse(restored)
    assert torch.equal(logits(restored), expected)
    saved_masks = mto.masks(model)
    assert {k: v.tolist() for k, v in mto.masks(restored).items()} == {k: v.tolist() for k, v in saved_masks.items()}
    assert restored._llmpress_sparsity["mode"] == "sparsegpt"
    assert restored._llmpress_sparsity["config"] == model._llmpress_sparsity["config"]
    if kind == "gpt2":
        assert restored.lm_head.weight is restored.transformer.wte.weight

    # The restored masks are active: pruned entries written by hand are zero again at the next forward...
    name, module = next(iter(layer_modules(restored, kind).items()))
    with torch.no_grad():
        as_out_in(module)[~saved_masks[name]] = 1.0
    assert torch.equal(logits(restored), expected)
    assert (as_out_in(module)[~saved_masks[name]] == 0).all()
    # ...and their gradients are zeroed.
    restored.train()
    restored(input_ids=PROBE, labels=PROBE).loss.backward()
    grad = module.weight.grad.t() if isinstance(module, Conv1D) else module.weight.grad
    assert (grad[~saved_masks[name]] == 0).all() and (grad[saved_masks[name]] != 0).any()


def test_save_writes_the_masked_weights_after_an_optimizer_step(tmp_path):
    model = sparse("llama")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # something other than a masked-gradient step wrote into pruned entries
        q.weight[~q._llmpress_mask] = 3.0
    mto.save(model, tmp_path / "ckpt")
    weight = load_file(str(tmp_path / "ckpt" / "weights.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert (weight[~mto.masks(model)["model.layers.0.self_attn.q_proj"]] == 0).all()


def test_save_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    model = sparse("llama", mode="sparse_magnitude")
    target = tmp_path / "ckpt"
    target.mkdir()
    mto.save(model, target)  # an existing empty directory is fine
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
        mto.save(model, target)
    assert (target / "notes.txt").exists()
    mto.save(model, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "weights.safetensors").exists()
    (tmp_path / "file.pt").write_text("x")
    with pytest.raises(FileExistsError, match="file.pt"):
        mto.save(model, tmp_path / "file.pt")


def test_save_needs_a_sparse_model(tmp_path):
    with pytest.raises(ValueError, match="no llmpress sparsity masks"):
        mto.save(llama(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture
def llama_ckpt(tmp_path):
    model = sparse("llama", mode="sparse_magnitude")
    return mto.save(model, tmp_path / "ckpt")


def test_restore_into_a_sparse_model_replaces_its_masks(llama_ckpt):
    other = sparse("llama", mode="sparsegpt")
    restored = mto.restore(other, llama_ckpt)
    assert restored._llmpress_sparsity["mode"] == "sparse_magnitude"
    assert all(len(m._forward_pre_hooks) <= 1 for m in restored.modules())  # the old hooks are gone
    reference = mto.restore(llama(seed=5), llama_ckpt)
    for name, mask in mto.masks(reference).items():
        assert torch.equal(mto.masks(restored)[name], mask), name
    assert set(mto.masks(restored)) == set(mto.masks(reference))
    assert torch.equal(logits(restored), logits(reference))


def test_restore_refuses_another_architecture(llama_ckpt):
    message = r"mask for module 'model\.layers\.0\.self_attn\.q_proj', which GPT2LMHeadModel does not have"
    with pytest.raises(ValueError, match=message):
        mto.restore(gpt2(), llama_ckpt)


def test_restore_refuses_another_shape(llama_ckpt):
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*\[64, 64\].*\[32, 32\]"):
        mto.restore(llama(hidden=32), llama_ckpt)


def test_restore_lists_missing_weights(llama_ckpt):
    deeper = llama(layers=3)
    before = logits(deeper)
    with pytest.raises(ValueError, match=r"missing 9 \(model\.layers\.2\..*, \.\.\.\), unexpected none"):
        mto.restore(deeper, llama_ckpt)
    assert not mto.is_sparse(deeper) and torch.equal(logits(deeper), before)  # untouched


def test_restore_lists_unexpected_weights(llama_ckpt):
    weights = load_file(str(llama_ckpt / "weights.safetensors"))
    del weights["model.norm.weight"]
    weights["model.extra.weight"] = torch.zeros(3)
    save_file(weights, str(llama_ckpt / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 \(model\.norm\.weight\), unexpected 1 \(model\.extra\.weight\)"):
        mto.restore(llama(), llama_ckpt)


def test_restore_needs_a_checkpoint_directory(tmp_path, llama_ckpt):
    with pytest.raises(FileNotFoundError, match="masks.safetensors"):
        (llama_ckpt / "masks.safetensors").unlink()
        mto.restore(llama(), llama_ckpt)
    with pytest.raises(FileNotFoundError, match="not an llmpress sparsity checkpoint"):
        mto.restore(llama(), tmp_path / "nowhere")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_keeps_its_masks_there(tmp_path):
    model = llama().cuda()
    mto.sparsify(model, "sparsegpt", config={"data_loader": batches()})  # CPU batches go to the model's device
    q = model.model.layers[0].self_attn.q_proj
    assert q._llmpress_mask.device.type == "cuda"
    assert_2_of_4(q.weight)
    expected = logits(model, PROBE.cuda()).cpu()
    mto.save(model, tmp_path / "ckpt")
    restored = mto.restore(llama(seed=9), tmp_path / "ckpt")  # on CPU
    torch.testing.assert_close(logits(restored), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_gives_a_plain_transformers_model(kind, tmp_path):
    model = sparse(kind)
    expected = logits(model)
    saved_masks = mto.masks(model)
    plain = mto.export(model)
    assert plain is model and not mto.is_sparse(plain) and mto.masks(plain) == {}
    assert not any("_llmpress" in name for name, _ in plain.named_buffers())
    assert all(len(m._forward_pre_hooks) == 0 for m in plain.modules())
    assert not any(k.startswith("_llmpress") for m in plain.modules() for k in vars(m))
    modules = layer_modules(plain, kind)
    for name, module in modules.items():
        assert_2_of_4(as_out_in(module))
    assert torch.equal(logits(plain), expected)

    # The gradient hooks are gone too: pruned entries now get gradients.
    plain.train()
    plain(input_ids=PROBE, labels=PROBE).loss.backward()
    name, module = next(iter(modules.items()))
    grad = module.weight.grad.t() if isinstance(module, Conv1D) else module.weight.grad
    assert (grad[~saved_masks[name]] != 0).any()

    plain.save_pretrained(tmp_path / "hf")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(loaded) is type(plain)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    for name, module in layer_modules(loaded, kind).items():
        assert_2_of_4(as_out_in(module))


def test_export_of_a_dense_model_changes_nothing():
    model = llama()
    before = logits(model)
    assert mto.export(model) is model
    assert torch.equal(logits(model), before)


# -------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mode, config, error, message", [
    ("sparse_wanda", {}, ValueError, r"mode must be one of \('sparsegpt', 'sparse_magnitude'\); got 'sparse_wanda'"),
    ("sparsegpt", {}, ValueError, r"config\['data_loader'\]"),
    ("sparsegpt", {"data_loader": None}, ValueError, r"config\['data_loader'\]"),
    ("sparse_magnitude", {"lr": 1}, ValueError, r"unknown key\(s\) \['lr'\]; allowed keys are \['data_loader', "),
    ("sparse_magnitude", {"block_size": 16}, ValueError, r"\['block_size'\] apply to mode 'sparsegpt' only"),
    ("sparse_magnitude", {"sparsity": 0.7}, ValueError, r"sparsity 0.7 contradicts mask_structure '2:4'"),
    ("sparse_magnitude", {"mask_structure": "4:2"}, ValueError, r"mask_structure must be"),
    ("sparse_magnitude", {"pipeline": "fast"}, ValueError, r"pipeline must be one of \('one_pass', 'two_pass'\)"),
    ("sparsegpt", {"data_loader": torch.zeros(2, 8, dtype=torch.long)}, ValueError,
     r"data_loader must be an iterable of batches.*got Tensor; wrap one batch in a list"),
    ("sparsegpt", {"data_loader": []}, ValueError, r"data_loader yielded no batches"),
    ("sparsegpt", {"data_loader": [(torch.zeros(1, 8, dtype=torch.long),)]}, ValueError,
     r"data_loader yielded a tuple for batch 0.*collect_func"),
    ("sparsegpt", {"data_loader": batches(), "collect_func": lambda b: [b]}, ValueError,
     r"collect_func returned a list for batch 0"),
])
def test_sparsify_errors(mode, config, error, message):
    model = llama()
    before = logits(model)
    with pytest.raises(error, match=message):
        mto.sparsify(model, mode, config=config)
    assert not mto.is_sparse(model) and torch.equal(logits(model), before)


def test_sparsify_refuses_a_model_that_is_already_sparse():
    model = sparse("llama", mode="sparse_magnitude")
    with pytest.raises(ValueError, match=r"already sparse \(mode 'sparse_magnitude'\); call export\(model\) first"):
        mto.sparsify(model, "sparse_magnitude")
    mto.sparsify(mto.export(model), "sparse_magnitude")  # after export it is an ordinary model again
    assert mto.is_sparse(model)
