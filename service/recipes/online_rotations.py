"""Online rotations: SpinQuant's R3 (queries and keys after RoPE) and R4 (down_proj's input), which cannot be fused
into weights and so run as hooks while the model computes.

R4 is a forward pre-hook on down_proj, whose weight absorbs the inverse; R3 wraps the model's registered attention
function (``config._attn_implementation``) with one that rotates queries and keys per head and then calls it. Both
are removable and described by ``online_transforms_description``, so a saved model gets them back with
``attach_online_transforms``. The rotation matrices and the weight fusion are ``service.algorithms.rotations``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import torch
from torch import nn

from service.algorithms.rotations import RotationSpec, rotate_input

_F64 = torch.float64

_R4_ATTR = "_llmpress_r4"
_R3_ATTR = "_llmpress_r3"
_R3_PREFIX = "llmpress_r3:"  # attention implementation key: prefix + the wrapped implementation


def _r4_hook(module: nn.Module, args: tuple) -> tuple:
    spec, matrix, _ = getattr(module, _R4_ATTR)
    return (spec.apply(args[0], matrix),) + tuple(args[1:])


def attach_r4(down_proj: nn.Linear, spec: RotationSpec, *, fuse: bool = True, precision: torch.dtype = _F64) -> None:
    """R4: down_proj's input is rotated online (``x @ M``, fwht for Hadamard kinds) and, when ``fuse``, its weight
    absorbs the inverse (``W <- W @ M``; M orthonormal), so ``down_proj`` computes the same function. ``fuse=False``
    re-attaches to a weight that already holds the fused rotation (a reloaded checkpoint)."""
    if getattr(down_proj, _R4_ATTR, None) is not None:
        raise ValueError("R4 is already attached to this module")
    if down_proj.in_features != spec.size:
        raise ValueError(f"R4: rotation of size {spec.size} for a Linear reading {down_proj.in_features}")
    block = spec.block_matrix() if spec.kind == "random-matrix" else None
    if fuse:
        rotate_input(down_proj, spec if block is None else torch.block_diag(*([block] * (spec.size // spec.block))),
                     precision=precision)
    handle = down_proj.register_forward_pre_hook(_r4_hook)
    setattr(down_proj, _R4_ATTR, (spec, block, handle))


def _base_attention(module: nn.Module, implementation: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":  # eager is each model file's own function, not a registered one
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _r3_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        # query/key: [batch, heads, seq, head_dim], after RoPE. A shared orthogonal R3 per head leaves every
        # q.k dot product, hence the attention, unchanged; quantizing the rotated k is what R3 is for.
        # transformers updates the KV cache before calling this, so a cache holds unrotated keys: a quantized
        # KV cache must rotate at its own update (not done here; the function is the same either way).
        r3 = getattr(module, _R3_ATTR, None)
        if r3 is not None:
            spec, matrix = r3
            query, key = spec.apply(query, matrix), spec.apply(key, matrix)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register_r3_implementation(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    key = _R3_PREFIX + base
    AttentionInterface.register(key, _r3_attention(base))
    # masks are built by implementation name too: the wrapped implementation's mask
    AttentionMaskInterface.register(key, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return key


def _set_attn_implementation(model: nn.Module, key: str) -> None:
    model.config._attn_implementation = key
    for module in model.modules():  # sub-modules holding another config object (rare) follow
        config = getattr(module, "config", None)
        if config is not None and config is not model.config and hasattr(config, "_attn_implementation"):
            config._attn_implementation = key


def mark_r3(attention: nn.Module, spec: RotationSpec) -> None:
    """Give one attention module its R3 (``spec.size == head_dim``); it takes effect once the model's attention
    implementation is wrapped (``enable_r3_attention``). Split so a streamed block can be marked on its own."""
    if getattr(attention, "head_dim", spec.size) != spec.size:
        raise ValueError(f"R3: rotation of size {spec.size} for heads of {attention.head_dim}")
    setattr(attention, _R3_ATTR, (spec, spec.block_matrix() if spec.kind == "random-matrix" else None))


def enable_r3_attention(model: nn.Module) -> None:
    """Switch ``config._attn_implementation`` to a registered wrapper of the current implementation that rotates
    queries and keys of every module marked by ``mark_r3`` and then calls the original. Idempotent."""
    current = model.config._attn_implementation or "eager"
    if not current.startswith(_R3_PREFIX):
        _set_attn_implementation(model, _register_r3_implementation(current))


def attach_r3(model: nn.Module, attention_modules: list[nn.Module], spec: RotationSpec) -> None:
    """R3: queries and keys of each attention module are rotated per head after RoPE, by wrapping the model's
    attention implementation (``config._attn_implementation``) with one that rotates and then calls it. No
    weights change (every q.k product is unchanged); no model source is patched."""
    for module in attention_modules:
        mark_r3(module, spec)
    enable_r3_attention(model)


def detach_online(module: nn.Module) -> None:
    """Take R4 hooks and R3 marks off ``module`` and its sub-modules (one streamed block, once written), leaving
    weights and the model's attention implementation as they are."""
    for sub in module.modules():
        if getattr(sub, _R4_ATTR, None) is not None:
            detach_r4(sub)
        if getattr(sub, _R3_ATTR, None) is not None:
            delattr(sub, _R3_ATTR)


def detach_r4(down_proj: nn.Module) -> None:
    """Remove R4's hook from one module, leaving its weight as it is."""
    spec, _, handle = getattr(down_proj, _R4_ATTR)
    handle.remove()
    delattr(down_proj, _R4_ATTR)


@torch.no_grad()
def remove_online_transforms(model: nn.Module, *, unfuse: bool = False) -> None:
    """Detach R3 and R4. With ``unfuse`` R4's fused inverse is taken back out of down_proj (``W <- W @ M^T``), so
    the model is the unrotated-R4 function again; without, the weights stay as they are (for saving: the
    description records what a loader must re-attach)."""
    for module in model.modules():
        r4 = getattr(module, _R4_ATTR, None)
        if r4 is not None:
            spec, _, handle = r4
            handle.remove()
            if unfuse:
                rotate_input(module, spec.matrix().T)
            delattr(module, _R4_ATTR)
        if getattr(module, _R3_ATTR, None) is not None:
            delattr(module, _R3_ATTR)
    current = model.config._attn_implementation or ""
    if current.startswith(_R3_PREFIX):
        _set_attn_implementation(model, current[len(_R3_PREFIX):])


def online_transforms_description(model: nn.Module, prefix: str = "") -> dict:
    """JSON-safe ``{"R3": {module name: spec}, "R4": {module name: spec}}`` of the online rotations attached to
    ``model``, each spec a ``RotationSpec`` as a dict (kind, size, block, seed); a key is absent when nothing of
    its kind is attached. ``attach_online_transforms`` takes it back. ``prefix``: ``model``'s own name (one
    streamed block), so the names are the full model's."""
    out: dict = {}
    for name, module in model.named_modules(prefix=prefix):
        for key, attr in (("R3", _R3_ATTR), ("R4", _R4_ATTR)):
            value = getattr(module, attr, None)
            if value is not None:
                out.setdefault(key, {})[name] = asdict(value[0])
    return out


def attach_online_transforms(model: nn.Module, description: dict) -> None:
    """Re-attach the online rotations of ``online_transforms_description`` to a model whose weights already hold
    the fused parts (a reloaded checkpoint): R4 hooks without fusing again, R3 around the attention function."""
    modules = dict(model.named_modules())
    unknown = set(description) - {"R3", "R4"}
    if unknown:
        raise ValueError(f"online transforms: unknown {sorted(unknown)}; allowed R3, R4")
    for key, entries in description.items():
        missing = [n for n in entries if n not in modules]
        if missing:
            raise ValueError(f"online transforms: {key} names modules the model lacks: {missing[:3]}")
        for name, spec in entries.items():
            if key == "R4":
                attach_r4(modules[name], RotationSpec(**spec), fuse=False)
            else:
                mark_r3(modules[name], RotationSpec(**spec))
    if "R3" in description:
        enable_r3_attention(model)


