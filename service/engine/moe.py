"""Mixture-of-experts blocks as one nn.Linear per expert projection, in the checkpoint's own layout.

Hub checkpoints of MoE models store every expert as its own Linears (``mlp.experts.7.gate_proj.weight``; Mixtral:
``block_sparse_moe.experts.7.w1.weight``), and transformers 5 fuses them when it loads into one module holding 3-D
tensors (``experts.gate_up_proj [experts, 2 * intermediate, hidden]``, ``experts.down_proj [experts, hidden,
intermediate]``). The engine streams the checkpoint's keys as they are and compresses ``nn.Linear``s, so
``unfuse_experts`` swaps each fused module of the meta-device skeleton for ``ExpertLinears``: the same forward
(``(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden]``) over
one small module of Linears per expert, named as the checkpoint names them. Then

- the per-expert keys load as they are and the output shards keep that layout (transformers fuses it again when
  it loads the output; vLLM reads it),
- every expert Linear is an ordinary ``targets: [Linear]`` module,
- each expert runs only on the tokens its router sends it, so the calibration hooks on its Linears see exactly
  those tokens: one Hessian per expert (gate and up share it, as in a dense MLP), counted in tokens.

Every expert is called on every forward in a fixed order, with an empty [0, hidden] input when the router sent it
nothing: every calibration batch reaches the same modules in the same order, which the pipelines rely on (two_pass
stops a batch after the last module the first batch reached; one_pass pauses every batch at each module). An
expert that got no token at all is compressed data-free (``compress_without_tokens``) and its report says so.

Routers are never compressed: in these families they are transformers' ``*TopKRouter`` modules, not nn.Linear,
so no target pattern ("Linear", "ALL", a regex) selects them. Shared experts (DeepSeek-V3) are plain MLPs already.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """How one model type lays out its experts: the fused class transformers builds, and the checkpoint's names."""

    experts_class: str  # the fused module's class in transformers
    gate: str  # names of an expert's projections in the checkpoint
    up: str
    down: str
    stored_block: str | None = None  # the checkpoint's name of the decoder layer's MoE block, when not the model's


FAMILIES = {
    "qwen3_moe": Family("Qwen3MoeExperts", "gate_proj", "up_proj", "down_proj"),
    "mixtral": Family("MixtralExperts", "w1", "w3", "w2", stored_block="block_sparse_moe"),
    "deepseek_v3": Family("DeepseekV3Experts", "gate_proj", "up_proj", "down_proj"),
}
# Router state the checkpoint stores as a buffer: made a parameter so it streams (loaded, written, released) with
# its block like every stored tensor (the engine streams parameters; DeepSeek-V3's routing depends on this bias).
STORED_BUFFERS = ("e_score_correction_bias",)


class MoEError(ValueError):
    """A mixture-of-experts model whose experts cannot be mapped; the message names the model type."""


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with its projections named as the checkpoint names them."""

    def __init__(self, family: Family, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__()
        self.names = (family.gate, family.up, family.down)
        setattr(self, family.gate, nn.Linear(hidden, intermediate, bias=False, device="meta"))
        setattr(self, family.up, nn.Linear(hidden, intermediate, bias=False, device="meta"))
        setattr(self, family.down, nn.Linear(intermediate, hidden, bias=False, device="meta"))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as a list of ``ExpertMLP``; computes what transformers' fused module computes.

    ``calibrate_all_experts`` (llm-compressor's ``moe_calibrate_all_experts``): every expert runs on every token,
    so its statistics cover all tokens, while the output still combines only the routed ones (the same function).
    """

    def __init__(self, experts: list[ExpertMLP], calibrate_all_experts: bool = False):
        super().__init__(experts)
        self.calibrate_all_experts = calibrate_all_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # (slot, token) pairs in transformers' order: torch.where over the [k, tokens] mask of this expert.
            top_k_pos, token_idx = torch.where((top_k_index == e).T)
            if self.calibrate_all_experts:
                y = expert(hidden_states)[token_idx]
            else:
                y = expert(hidden_states[token_idx])  # possibly [0, hidden]: the hooks still see the call
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_fused_experts(name: str, module: nn.Module) -> bool:
    """Experts stored as 3-D tensors: a module named or typed for experts with a parameter of rank >= 3 (a
    convolution's 3-D weight, as in Mamba-style layers, is not one)."""
    named = "expert" in type(module).__name__.lower() or "expert" in name.rpartition(".")[2].lower()
    return named and any(p.dim() >= 3 for p in module.parameters(recurse=False))


def check_supported(model: nn.Module) -> Family | None:
    """The model's Family, None for a dense model; MoEError for experts this module cannot map."""
    fused = [(n, m) for n, m in model.named_modules() if _is_fused_experts(n, m)]
    if not fused:
        return None
    model_type = getattr(model.config, "model_type", "?")
    supported = ", ".join(sorted(FAMILIES))
    family = FAMILIES.get(model_type)
    if family is None:
        raise MoEError(f"model: {model_type} is a mixture-of-experts model ({type(fused[0][1]).__name__} at "
                       f"{fused[0][0]}) whose experts llmpress cannot map to the checkpoint yet; "
                       f"supported: {supported}")
    for name, module in fused:
        params = dict(module.named_parameters(recurse=False))
        if type(module).__name__ != family.experts_class or set(params) != {"gate_up_proj", "down_proj"}:
            raise MoEError(f"model: {model_type}'s experts at {name} are a {type(module).__name__} with "
                           f"{sorted(params)}; llmpress maps {family.experts_class} with gate_up_proj and down_proj "
                           f"(this transformers version changed them?); supported: {supported}")
    return family


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace, in place, every fused experts module of a model by ``ExpertLinears`` named as the checkpoint names
    its keys; the model itself, unchanged when it has no experts. MoEError before any work for an MoE model whose
    experts are not mapped.

    On the meta device (the streamed skeleton) the Linears are empty and router buffers the checkpoint stores become
    parameters, to stream with their block; a model in memory gets each expert's slices of the fused tensors
    (``gate_up_proj[e]`` is [gate; up], [2 * intermediate, hidden]; ``down_proj[e]`` [hidden, intermediate])."""
    family = check_supported(model)
    if family is None:
        return model
    calibrate_all = bool(getattr(model.config, "moe_calibrate_all_experts", False))
    for name, module in list(model.named_modules()):
        if not _is_fused_experts(name, module):
            continue
        num, two_inter, hidden = module.gate_up_proj.shape
        inter = two_inter // 2
        experts = [ExpertMLP(family, hidden, inter, module.act_fn) for _ in range(num)]
        meta = module.gate_up_proj.is_meta
        if not meta:
            gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
            grad = module.gate_up_proj.requires_grad
            for e, expert in enumerate(experts):
                for proj, tensor in ((family.gate, gate_up[e, :inter]), (family.up, gate_up[e, inter:]),
                                     (family.down, down[e])):
                    getattr(expert, proj).weight = nn.Parameter(tensor.clone(), requires_grad=grad)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, leaf, ExpertLinears(experts, calibrate_all))
        for buffer in STORED_BUFFERS if meta else ():
            for sub in owner.modules():
                if buffer in sub._buffers:
                    tensor = sub._buffers.pop(buffer)
                    sub._parameters[buffer] = nn.Parameter(torch.empty_like(tensor, device="meta"),
                                                           requires_grad=False)
        if family.stored_block:
            _rename_block(model, owner_name, family.stored_block)
    return model


def _rename_block(model: nn.Module, block_name: str, stored: str) -> None:
    """Register the MoE block under the checkpoint's name (Mixtral: ``block_sparse_moe``, which transformers 5
    renames to ``mlp`` when it loads) so parameter names are the checkpoint's keys; the layer's forward still finds
    it as ``self.mlp``: an instance attribute, which Python looks up before nn.Module's registry."""
    layer_name, _, attr = block_name.rpartition(".")
    layer = model.get_submodule(layer_name)
    block = layer._modules.pop(attr)
    layer._modules[stored] = block
    layer.__dict__[attr] = block


def set_calibrate_all_experts(model: nn.Module, enabled: bool) -> None:
    """Turn llm-compressor's ``moe_calibrate_all_experts`` on or off for every MoE block of ``model`` (and in its
    config, so a data-parallel worker that builds its own skeleton from it does the same)."""
    for module in model.modules():
        if isinstance(module, ExpertLinears):
            module.calibrate_all_experts = enabled
    if getattr(model, "config", None) is not None:
        model.config.moe_calibrate_all_experts = enabled


def expert_of(name: str) -> tuple[str, int] | None:
    """(the experts module's name, expert index) of an expert projection's full name, else None."""
    parts = name.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] == "experts" and parts[i].isdigit():
            return ".".join(parts[: i]), int(parts[i])
    return None


def compress_without_tokens(task, statistic: Any) -> dict:
    """Compress a module whose router sent it no calibration token, data-free: magnitude pruning for the pruning
    modifiers (SparseGPT, Wanda), round-to-nearest for GPTQ (GPTQ on an identity Hessian is exactly RTN: no
    error to compensate across columns); the report says ``"fallback"``. Other modifiers get the empty statistic."""
    from service.algorithms.magnitude import magnitude_prune
    from service.recipes.pruning_modifiers import SparsityModifierBase
    from service.recipes.targets import set_weight_matrix, weight_matrix

    compressor, module = task.compressor, task.module
    log.warning("%s received no calibration token; compressed data-free", task.name)
    if isinstance(compressor, SparsityModifierBase):
        weight = weight_matrix(module).detach()
        new_weight, mask = magnitude_prune(weight, task.sparsity, mask_structure=compressor.nm,
                                           preserve_sparsity_mask=compressor.preserve_sparsity_mask)
        set_weight_matrix(module, new_weight)
        report = {"modifier": type(compressor).__name__, "shape": list(weight.shape),
                  "sparsity_target": task.sparsity,
                  "sparsity": float((new_weight == 0).sum().item() / new_weight.numel()), "fallback": "magnitude"}
        return report
    if compressor.statistic == "hessian":
        from types import SimpleNamespace

        columns = weight_matrix(module).shape[1]
        identity = SimpleNamespace(hessian=torch.eye(columns, device=module.weight.device))
        report = compressor.compress_module(task.name, module, identity, task.sparsity)
        report["fallback"] = "rtn"
        return report
    return compressor.compress_module(task.name, module, statistic, task.sparsity)


def moe_summary(modules: dict[str, dict]) -> dict:
    """The report's ``{"moe": ...}`` for a run's per-module entries: how many expert projections were compressed,
    the fewest and most calibration tokens one got, and which fell back to a data-free method (and to which);
    ``{}`` for a model without experts."""
    experts = {name: entry for name, entry in modules.items() if expert_of(name) is not None}
    if not experts:
        return {}
    tokens = [entry["tokens"] for entry in experts.values() if "tokens" in entry]
    return {"moe": {
        "expert_modules": len(experts),
        "min_tokens": min(tokens) if tokens else None,
        "max_tokens": max(tokens) if tokens else None,
        "fallback": {name: entry["fallback"] for name, entry in experts.items() if "fallback" in entry},
    }}
