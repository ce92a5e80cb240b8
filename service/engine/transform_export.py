"""Online rotations (SpinQuant R3/R4) in a checkpoint: compressed-tensors' ``transform_config`` and its tensors.

Fused rotations (R1, R2, R4's inverse) are already in the weights. What a reader must still run is recorded twice:

* as a compressed-tensors ``TransformConfig``: group ``R4`` (location ``input`` of each down_proj) and group
  ``R3`` (locations ``q_attn`` and ``k_cache`` of each attention module, ``head_dim`` the head size), with the
  transform tensors written beside the weights under the names the library gives its transform modules
  (``<module>.<group>_<location>.weight``). The library's ``apply_transform_config`` builds those modules and
  hooks; loading our tensors into them gives exactly our matrices. Hadamard kinds are stored as the ±1 matrix
  the library's "hadamard" transform divides by sqrt(n); a random rotation as "random-matrix", stored as is.
* as ``llmpress_online_transforms``: our own exact description (kind, size, block, seed per module), from which
  ``service.recipes.online_rotations.attach_online_transforms`` rebuilds the transforms with no tensors at all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from service.algorithms.rotations import RotationSpec

__all__ = ["DESCRIPTION_KEY", "transform_config", "transform_tensors", "load_transform_tensors"]

DESCRIPTION_KEY = "llmpress_online_transforms"
# (our rotation, compressed-tensors locations it occupies)
_LOCATIONS = {"R4": ("input",), "R3": ("q_attn", "k_cache")}


def _ct_type(spec: RotationSpec) -> str:
    if spec.kind == "random-matrix":
        return "random-matrix"
    # The library's "hadamard" is built for powers of two only; its "random-hadamard" also has the other orders
    # models need. Either way the matrix that runs is the one stored beside the weights.
    return "hadamard" if spec.kind == "hadamard" and spec.size & (spec.size - 1) == 0 else "random-hadamard"


def _stored(spec: RotationSpec) -> torch.Tensor:
    """The tensor compressed-tensors keeps for ``spec``: its transforms compute ``x @ weight`` (over blocks of
    ``head_dim`` for R3), the hadamard one then divides by sqrt(size of the weight)."""
    if spec.kind == "random-matrix":
        return spec.matrix().to(torch.float32)
    # The ±1 Hadamard block, exact, times sqrt(size / block): the library divides by sqrt(size), not sqrt(block).
    block = (spec.block_matrix() * math.sqrt(spec.block)).round() * math.sqrt(spec.size / spec.block)
    return torch.block_diag(*([block] * (spec.size // spec.block))).to(torch.float32)


def transform_config(description: dict) -> dict:
    """compressed-tensors ``TransformConfig`` (as JSON) for ``online_transforms_description(model)``."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    groups = {}
    for key, entries in sorted(description.items()):
        specs = {name: RotationSpec(**spec) for name, spec in entries.items()}
        types = {_ct_type(s) for s in specs.values()}
        if len(types) != 1:
            raise ValueError(f"online transforms: {key} mixes transform types {sorted(types)}")
        head_dim = next(iter(specs.values())).size if key == "R3" else None
        groups[key] = TransformScheme(
            type=types.pop(), head_dim=head_dim,
            apply=[TransformArgs(targets=sorted(specs), location=loc) for loc in _LOCATIONS[key]],
        )
    return TransformConfig(config_groups=groups).model_dump(mode="json")


def transform_tensors(description: dict) -> dict[str, torch.Tensor]:
    """The transform tensors of the online rotations in ``online_transforms_description(...)``, by checkpoint
    name (each spec determines its matrix)."""
    return {f"{name}.{key}_{loc}.weight": _stored(RotationSpec(**spec))
            for key, entries in description.items() for name, spec in entries.items() for loc in _LOCATIONS[key]}


def load_transform_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """After compressed-tensors' ``apply_transform_config``: give each transform module its own stored tensor
    (the library shares one per size, which would be wrong for per-layer rotations). Returns how many."""
    count = 0
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        current = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(tensor.to(current.dtype).to(current.device), requires_grad=False))
        count += 1
    return count
