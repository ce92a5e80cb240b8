"""Which modules a modifier acts on: llm-compressor's `targets` / `ignore` vocabulary.

A pattern is one of
- "ALL": every compressible module;
- "re:<regex>": the module's full dotted name matches the regex (`re.match`, anchored at the start, as
  llm-compressor does, so "re:.*q_proj" and "re:model.layers.0.*" both work);
- a class name ("Linear", "Conv1D", "LlamaDecoderLayer"): the module's class or one of its base classes;
- a module name: equal to the full dotted name, or to its last components ("q_proj", "self_attn.q_proj").

``sequential_targets`` names the blocks a pipeline streams in the same vocabulary; without it ``find_blocks``
finds the model's decoder layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

try:  # GPT-2 style models keep their linear maps in transformers' Conv1D, weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

# Modules whose 2-D weight the pruning algorithms understand. "Linear" in a recipe also selects Conv1D:
# users write the same recipe for Llama and GPT-2.
COMPRESSIBLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def as_patterns(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _class_names(module: nn.Module) -> set[str]:
    names = {cls.__name__ for cls in type(module).__mro__}
    if isinstance(module, COMPRESSIBLE):
        names.add("Linear")
    return names


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern == "ALL":
        return True
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern in _class_names(module):
        return True
    return name == pattern or name.endswith("." + pattern)


def matches_any(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    return any(matches(name, module, p) for p in patterns)


def compressible_modules(
    root: nn.Module, prefix: str, targets: Sequence[str], ignore: Sequence[str]
) -> list[tuple[str, nn.Module]]:
    """The compressible modules under `root` selected by targets and not by ignore, in definition order.

    `prefix` is root's full dotted name in the model, so patterns see the same names as in the checkpoint.
    """
    found = []
    for local, module in root.named_modules():
        if not isinstance(module, COMPRESSIBLE):
            continue
        name = f"{prefix}.{local}" if prefix and local else (prefix or local)
        if matches_any(name, module, targets) and not matches_any(name, module, ignore):
            found.append((name, module))
    return found


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out_features, in_features] (a view for Conv1D, whose storage is [in, out])."""
    w = module.weight
    return w.t() if Conv1D and isinstance(module, Conv1D) else w


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] matrix back into the module's own layout, in place (masks and ties keep pointing at it)."""
    target = module.weight
    source = weight.t() if Conv1D and isinstance(module, Conv1D) else weight
    with torch.no_grad():
        target.copy_(source.to(dtype=target.dtype, device=target.device))


class TargetError(RuntimeError):
    """A recipe's targets name no module of the model (or its blocks cannot be found)."""


def find_blocks(model: nn.Module, sequential_targets: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks in execution order, as (full name, module).

    With `sequential_targets` (class names, module names or "re:" patterns) the outermost matching modules;
    otherwise the children of the ModuleList whose class the model lists in `_no_split_modules` (decoder layers),
    or failing that the longest ModuleList of one class (BERT-style encoder stacks).
    """
    patterns = as_patterns(sequential_targets)
    if patterns:
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if name and matches_any(name, module, patterns):
                if not any(name.startswith(outer + ".") for outer, _ in found):
                    found.append((name, module))
        if not found:
            raise TargetError(f"sequential_targets {patterns} match no module of {type(model).__name__}")
        return found
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best, best_key = None, None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child).__name__ for child in module}
        if len(classes) != 1:
            continue
        key = (classes.pop() in no_split, len(module), sum(p.numel() for p in module.parameters()))
        if best_key is None or key > best_key:
            best, best_key = name, key
    if best is None:
        raise TargetError(
            f"cannot find the repeated blocks of {type(model).__name__}; name them with sequential_targets"
        )
    layers = model.get_submodule(best)
    return [(f"{best}.{i}", layer) for i, layer in enumerate(layers)]
