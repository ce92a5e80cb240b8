"""NVIDIA ModelOpt-style sparsity API over the llmpress engine: sparsify, save, restore, export.

    from service.engine import modelopt as mto  # ModelOpt splits this into mts (sparsity) and mto (opt)
    model = mto.sparsify(model, "sparsegpt", config={"data_loader": loader, "collect_func": f})
    mto.save(model, "ckpt")                   # a directory: weights, masks, metadata; no pickle
    model = mto.restore(fresh_model, "ckpt")  # same weights, masks active again
    model = mto.export(model)                 # masks baked in, hooks and buffers gone: a plain model

While a model is sparse, each pruned module holds its keep-mask as a non-persistent bool buffer `_llmpress_mask`
in the weight's own layout (transformers' Conv1D stores [in, out]; masks everywhere else, in files and in
`masks()`, are [out, in]). Two hooks keep the pruned weights at zero while the model is fine-tuned:
- a tensor hook on the weight zeroes the gradient of pruned entries, so optimizers with per-entry updates (SGD,
  Adam, AdamW with decoupled weight decay) leave them exactly zero after every step;
- a forward pre-hook zeroes them again before every forward, for whatever else wrote into the weight
  (a manual edit, an optimizer that mixes entries, `load_state_dict`).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.engine.export import AtomicDirectory, OutputExistsError, write_json
from service.engine.oneshot import oneshot
from service.engine.pipeline import PIPELINES, to_device
from service.recipes.pruning_modifiers import MagnitudePruningModifier, SparseGPTModifier
from service.recipes.targets import COMPRESSIBLE, Conv1D

log = logging.getLogger(__name__)

MODES = ("sparsegpt", "sparse_magnitude")
DATA_KEYS = ("data_loader", "collect_func")
PRUNING_KEYS = ("mask_structure", "sparsity", "targets", "ignore", "pipeline", "device")
SPARSEGPT_KEYS = ("block_size", "dampening_frac")
CONFIG_KEYS = DATA_KEYS + PRUNING_KEYS + SPARSEGPT_KEYS
DEFAULT_MASK_STRUCTURE = "2:4"  # ModelOpt's default pattern: what sparse tensor cores accelerate

MASK_BUFFER = "_llmpress_mask"
METADATA_ATTR = "_llmpress_sparsity"
_STATE_ATTR = "_llmpress_mask_state"

WEIGHTS_FILE = "weights.safetensors"
MASKS_FILE = "masks.safetensors"
METADATA_FILE = "llmpress_sparsity.json"
FORMAT = "llmpress-sparsity"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------------ sparsify


def sparsify(model: nn.Module, mode: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Prune `model` in place with `mode` ("sparsegpt" or "sparse_magnitude") and keep its masks active.

    config: `data_loader` (iterable of batches; required for sparsegpt), `collect_func` (batch -> input_ids
    tensor or dict of model kwargs), and the pruning options `mask_structure` (default "2:4"), `sparsity`,
    `targets`, `ignore`, `pipeline` (default: oneshot's), `device`, and for sparsegpt `block_size`,
    `dampening_frac`.
    Returns the same model object.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; allowed keys are {list(CONFIG_KEYS)}")
    if mode != "sparsegpt":
        misplaced = [k for k in SPARSEGPT_KEYS if k in config]
        if misplaced:
            raise ValueError(f"config: {misplaced} apply to mode 'sparsegpt' only, not {mode!r}")
    if is_sparse(model):
        raise ValueError(
            f"{type(model).__name__} is already sparse (mode {_metadata(model).get('mode')!r}); "
            "call export(model) first to bake its masks in, then sparsify again"
        )
    run = {"pipeline": config["pipeline"]} if "pipeline" in config else {}  # else the engine's default
    if "pipeline" in run and run["pipeline"] not in PIPELINES:
        raise ValueError(f"config: pipeline must be one of {PIPELINES}; got {run['pipeline']!r}")

    options = {k: config[k] for k in ("sparsity", "targets", "ignore") + SPARSEGPT_KEYS if k in config}
    options["mask_structure"] = config.get("mask_structure", DEFAULT_MASK_STRUCTURE)
    cls = SparseGPTModifier if mode == "sparsegpt" else MagnitudePruningModifier
    modifier = cls(**options)  # pydantic's ValidationError is a ValueError naming the field

    batches = None
    if mode == "sparsegpt":  # magnitude pruning reads no data, so a given data_loader is not even iterated
        if config.get("data_loader") is None:
            raise ValueError("config: mode 'sparsegpt' calibrates on data; give config['data_loader'] (an iterable "
                             "of batches) and, if a batch is not the model's input, config['collect_func']")
        batches = _model_batches(model, config["data_loader"], config.get("collect_func"))

    # oneshot calibrates in eval mode (no dropout) and gives every module its mode back.
    report = oneshot(model, [modifier], batches=batches, keep_masks=True, device=config.get("device"), **run)

    for name, mask in modifier.masks.items():
        _attach(model.get_submodule(name), mask)
    saved_config = {k: v for k, v in config.items() if k not in DATA_KEYS}
    saved_config["mask_structure"] = options["mask_structure"]
    if "device" in saved_config and saved_config["device"] is not None:
        saved_config["device"] = str(saved_config["device"])
    setattr(model, METADATA_ATTR, {"mode": mode, "config": saved_config, "report": report})
    log.info("sparsify(%s): %d modules pruned, sparsity %.3f of targeted weights", mode, len(modifier.masks),
             report["totals"]["sparsity"])
    return model


def _model_batches(model: nn.Module, data_loader: Any, collect_func: Callable | None) -> list[dict]:
    """The model-input dicts of every batch, on the device of the model's first parameter (its embeddings, where
    capture runs the forward)."""
    if isinstance(data_loader, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data_loader, Iterable):
        hint = "; wrap one batch in a list" if isinstance(data_loader, (torch.Tensor, Mapping)) else ""
        raise ValueError(f"config: data_loader must be an iterable of batches (a DataLoader or a list); "
                         f"got {type(data_loader).__name__}{hint}")
    home = next(model.parameters()).device
    batches = []
    for k, batch in enumerate(data_loader):
        inputs = collect_func(batch) if collect_func is not None else batch
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs}
        elif isinstance(inputs, Mapping):
            inputs = dict(inputs)
        else:
            where = "collect_func returned" if collect_func is not None else "data_loader yielded"
            raise ValueError(
                f"config: {where} a {type(inputs).__name__} for batch {k}; a batch must become an input_ids tensor "
                "or a dict of model kwargs (give a collect_func that maps a batch to one)"
            )
        batches.append(to_device(inputs, home))
    if not batches:
        raise ValueError("config: data_loader yielded no batches")
    return batches


# ------------------------------------------------------------------------------------------------- masks on modules


def _to_layout(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """[out, in] <-> the module's weight layout (Conv1D stores [in, out]); the transpose is its own inverse."""
    return mask.t() if Conv1D and isinstance(module, Conv1D) else mask


def _apply_mask(module: nn.Module) -> None:
    """Zero the pruned entries of module.weight in place.

    Through `.data` on purpose: a module called twice in one forward has its weight saved for backward, and an
    in-place write on the parameter itself would bump its version and fail that backward. The write only sets
    entries that must be zero anyway, so what autograd saved stays valid.
    """
    mask = module._buffers[MASK_BUFFER]
    module.weight.data.masked_fill_(~mask.to(module.weight.device), 0)


def _zero_pruned_grad(module_ref: weakref.ref) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        module = module_ref()
        mask = None if module is None else module._buffers.get(MASK_BUFFER)
        if mask is None:  # exported, or the module is gone
            return grad
        return grad.masked_fill(~mask.to(grad.device), 0)

    return hook


class _MaskState:
    """A pruned module's hook handles; the gradient hook lives on one weight tensor, remembered weakly."""

    def __init__(self, pre_hook):
        self.pre_hook = pre_hook
        self.weight_ref: weakref.ref | None = None
        self.grad_hook = None

    def ensure_grad_hook(self, module: nn.Module) -> None:
        """(Re)register the gradient hook when the module's weight is a new tensor (replaced, or a deepcopy)."""
        weight = module.weight
        if self.weight_ref is not None and self.weight_ref() is weight:
            return
        if self.grad_hook is not None:
            self.grad_hook.remove()
        self.grad_hook = weight.register_hook(_zero_pruned_grad(weakref.ref(module))) if weight.requires_grad else None
        self.weight_ref = weakref.ref(weight) if self.grad_hook is not None else None

    def remove(self) -> None:
        self.pre_hook.remove()
        if self.grad_hook is not None:
            self.grad_hook.remove()


def _mask_pre_hook(module: nn.Module, args) -> None:
    # A module-level function and no closure, so a deepcopy of the model masks its own modules.
    state = module.__dict__.get(_STATE_ATTR)
    if state is not None:
        state.ensure_grad_hook(module)
    _apply_mask(module)


def _attach(module: nn.Module, mask: torch.Tensor) -> None:
    """Keep `mask` (bool [out, in], True = keep) on module and zero its pruned weights, now and after changes."""
    if not isinstance(module, COMPRESSIBLE):
        raise ValueError(f"{type(module).__name__} is not a Linear/Conv1D module; it cannot hold a sparsity mask")
    mask = _to_layout(module, mask.to(torch.bool)).contiguous().to(module.weight.device)
    module.register_buffer(MASK_BUFFER, mask, persistent=False)  # the checkpoint keeps masks in masks.safetensors
    state = _MaskState(module.register_forward_pre_hook(_mask_pre_hook))
    state.ensure_grad_hook(module)
    module.__dict__[_STATE_ATTR] = state
    _apply_mask(module)


def _detach(module: nn.Module) -> None:
    """Bake the mask into the weight and remove the mask, its hooks and its state."""
    _apply_mask(module)
    state = module.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        state.remove()
    else:  # a copy whose handles point at the original's hook dicts: find the pre-hook by identity
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _mask_pre_hook:
                del module._forward_pre_hooks[key]
    del module._buffers[MASK_BUFFER]


def _masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if MASK_BUFFER in m._buffers]


def is_sparse(model: nn.Module) -> bool:
    """True while some module of the model carries an llmpress mask (after sparsify or restore, before export)."""
    return bool(_masked_modules(model))


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: keep-mask}, bool [out, in] on CPU (copies), for every pruned module."""
    return {name: _to_layout(m, m._buffers[MASK_BUFFER]).cpu().clone() for name, m in _masked_modules(model)}


def _metadata(model: nn.Module) -> dict:
    return getattr(model, METADATA_ATTR, None) or {}


# ------------------------------------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the sparse model to the directory `path`: weights.safetensors (the state_dict, tied weights once),
    masks.safetensors (uint8 [out, in] keep-masks by module name) and llmpress_sparsity.json (mode, config,
    report). The directory appears complete or not at all. Returns its resolved path."""
    from safetensors.torch import save_file

    if not is_sparse(model):
        raise ValueError(f"save: {type(model).__name__} has no llmpress sparsity masks; sparsify or restore it first "
                         "(a dense model is saved with save_pretrained)")
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"save: '{path}' already exists and is not an empty directory; "
                                "choose another path or pass overwrite=True")
    for _, module in _masked_modules(model):
        _apply_mask(module)  # weights written after the last forward (an optimizer step) are saved masked
    weights, tied = _unique_state(model)
    keep = masks(model)
    metadata = {
        "format": FORMAT, "version": FORMAT_VERSION, "model_class": type(model).__name__,
        **_metadata(model), "tied": tied, "masks": {name: list(m.shape) for name, m in keep.items()},
    }
    with AtomicDirectory(path, overwrite=path.exists()) as out:
        save_file(weights, str(out.tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file({name: m.to(torch.uint8).contiguous() for name, m in keep.items()},
                  str(out.tmp / MASKS_FILE), metadata={"format": "pt"})
        write_json(out.tmp / METADATA_FILE, metadata)
        return out.publish()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict with every tensor once: {name: tensor} and {dropped tied name: kept name}.

    safetensors refuses two names for one storage; a tied tensor (lm_head / embeddings) is written under its first
    name. Other overlapping views are written as copies.
    """
    kept: dict[tuple, str] = {}
    storages: set[tuple] = set()
    weights: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        key = storage + (tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in kept:
            tied[name] = kept[key]
            continue
        kept[key] = name
        shared = storage in storages and tensor.numel() > 0
        storages.add(storage)
        weights[name] = tensor.clone() if shared or not tensor.is_contiguous() else tensor
    return weights, tied


# ------------------------------------------------------------------------------------------------------- restore


def restore(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a directory written by save() into `model` (built like the saved one): weights, masks (active again)
    and metadata. Everything is checked before the model is changed. Returns the same model object."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    missing_files = [n for n in (WEIGHTS_FILE, MASKS_FILE, METADATA_FILE) if not (path / n).is_file()]
    if missing_files:
        raise FileNotFoundError(f"restore: '{path}' is not an llmpress sparsity checkpoint; it lacks {missing_files}")
    metadata = json.loads((path / METADATA_FILE).read_text())
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"restore: {path / METADATA_FILE} is format {metadata.get('format')!r} version "
                         f"{metadata.get('version')!r}; this llmpress reads {FORMAT!r} version {FORMAT_VERSION}")
    stored_masks = load_file(str(path / MASKS_FILE))  # small: a byte per weight, once
    order = list(metadata.get("masks") or stored_masks)  # the model's module order, so errors name the first
    if set(order) != set(stored_masks):
        raise ValueError(f"restore: {path / MASKS_FILE} and {METADATA_FILE} list different modules")
    saved_masks = {name: stored_masks[name].to(torch.bool) for name in order}
    arch = type(model).__name__
    for name, mask in saved_masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"restore: the checkpoint has a mask for module '{name}', which {arch} does not have "
                             f"(saved from {metadata.get('model_class')}); restore into a model built the same "
                             "way") from None
        if not isinstance(module, COMPRESSIBLE):
            raise ValueError(f"restore: module '{name}' of {arch} is a {type(module).__name__}, not a Linear/Conv1D")
        shape = tuple(_to_layout(module, module.weight).shape)
        if shape != tuple(mask.shape):
            raise ValueError(f"restore: module '{name}': the checkpoint's mask is {list(mask.shape)} [out, in] but "
                             f"{arch}'s weight is {list(shape)}; restore into a model of the same shape")

    tied: dict[str, str] = metadata.get("tied", {})
    targets = model.state_dict()
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        stored = set(f.keys())
        missing = [k for k in targets if k not in stored and tied.get(k) not in stored]
        unexpected = [k for k in stored if k not in targets]
        if missing or unexpected:
            raise ValueError(f"restore: the weights do not match {arch}: missing {_few(missing)}, "
                             f"unexpected {_few(unexpected)}")
        for name, target in targets.items():
            shape = list(f.get_slice(name if name in stored else tied[name]).get_shape())
            if shape != list(target.shape):
                raise ValueError(f"restore: '{name}' is {shape} in the checkpoint but {list(target.shape)} in {arch}")
        for _, module in _masked_modules(model):
            _detach(module)  # the checkpoint's masks replace any the model had
        with torch.no_grad():  # one tensor in memory at a time, copied into the model's own storage and dtype
            for name, target in targets.items():
                target.copy_(f.get_tensor(name if name in stored else tied[name]))
    for name, mask in saved_masks.items():
        _attach(model.get_submodule(name), mask)
    setattr(model, METADATA_ATTR, {k: metadata[k] for k in ("mode", "config", "report") if k in metadata})
    return model


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


# ------------------------------------------------------------------------------------------------------- export


def export(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights and remove every llmpress hook, buffer and attribute: what is left is the
    plain model (its save_pretrained output loads in transformers unchanged), with the zeros in its weights.
    A model that is not sparse is returned as it is. Returns the same model object."""
    for _, module in _masked_modules(model):
        _detach(module)
    if METADATA_ATTR in model.__dict__:
        delattr(model, METADATA_ATTR)
    return model
