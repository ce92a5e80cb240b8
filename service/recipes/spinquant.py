"""SpinQuant (Liu et al. 2024, arXiv:2405.16406): rotations R1-R4 that leave the model's function unchanged and
make its weights and activations easier to quantize; optionally learned with Cayley SGD.

    R1  hidden size, offline: embedding and every residual writer (o_proj, down_proj) rotate their output,
        every residual reader (q/k/v, gate/up, lm_head) its input.
    R2  head_dim, offline, per layer: v_proj's output and o_proj's input, head by head (GQA-aware).
    R3  head_dim, online: queries and keys after RoPE (for KV-cache quantization); q.k is unchanged.
    R4  intermediate size, online: down_proj's input, with the inverse fused into down_proj's weight.

The recipe vocabulary is llm-compressor's ``SpinQuantModifier`` (rotations, transform_type, randomize, learnable,
precision, transform_block_size, mappings, norm_mappings). Unlike llm-compressor 0.14, the result is the same
function as the model it started from (max |logit change| ~4e-5 in float32 on stories260K). Why theirs is not,
from reading ``llmcompressor/modifiers/transform/spinquant/base.py`` and ``modeling/fuse.py`` and measuring:

* it always calls ``center_embeddings`` (each embedding row's mean subtracted). That preserves the function only
  before a LayerNorm; Llama's RMSNorm divides by an RMS that includes the mean. On stories260K, centring alone
  moves the logits of 256 TinyStories tokens by up to 4.87, and centring followed by our exact R1+R2 by the same
  4.87: the centring is the whole error. ``rotations.center_embeddings`` refuses RMSNorm models.
* not a cause: tied embeddings (it unties before centring) and fusion precision (float64 by default,
  ``get_high_precision``).

Three entry points, so the streaming pipeline can rotate one block at a time:

    plan = spinquant_plan(model.config, modifier, *infer_mappings(model))  # rotations, sizes
    rotate_outside(model, plan)                         # untie; embeddings, final norm, lm_head
    rotate_block(block, name, index, plan)              # one decoder layer (norm fusion, R1, R2, R4, R3 mark)
    finish_online(model, plan)                          # wrap the attention function for R3

``apply_spinquant(model, modifier, batches)`` composes them (and learns R1/R2 first when ``learnable``).

Learned per-channel scalings (``learnable`` with ``learn_scales``, after OSTQuant, arXiv:2501.13987). Folding an
RMSNorm's weight g into the Linears that read it is what lets R1 commute with the norm, but it also takes away g's
role as a free per-input-channel quantization scale: stories260K's post_attention_layernorm gives its outlier
channels a small g, and with g folded, Hadamard R1+R2 + W4 RTN is worse on TinyStories than no rotation (6.845 vs
6.368). After R1 the norm weight is free again, so these scalings, exact for any positive s, t, u, are learned with
R1/R2 and fused after them (before R4):

    attn / mlp  [hidden]           norm weight / s, the norm's readers' columns (q/k/v; gate/up) * s
    ud          [intermediate]     up_proj rows / t, down_proj columns * t        (SwiGLU is linear in up)
    vo          [kv_heads * d]     v_proj rows / u, o_proj columns * u            (u shared by each GQA group)

``r1_init: identity`` starts R1 and the norms where the unrotated model has them (R1 = I, s = 1/|g|): a model
whose norm weights protect its outlier channels, as stories260K's do, keeps that protection unless rotating pays
on the calibration loss; from Hadamard it has to win it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from service.algorithms import rotations as rot
from service.recipes import online_rotations as online
from service.recipes.modifier import Modifier
from service.recipes.recipe import register_modifier
from service.recipes.targets import matches

__all__ = [
    "SpinQuantMapping",
    "NormMapping",
    "SpinQuantModifier",
    "SpinQuantPlan",
    "SUPPORTED_ARCHITECTURES",
    "infer_mappings",
    "spinquant_plan",
    "rotate_outside",
    "rotate_block",
    "finish_online",
    "apply_spinquant",
    "learn_rotations",
    "cayley_sgd_step",
]

ROTATIONS = ("R1", "R2", "R3", "R4")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


class SpinQuantMapping(BaseModel):
    """Where each rotation goes: module names or ``re:`` regexes over full dotted names (llm-compressor's fields).

    ``attn_head_dim`` overrides the config's head_dim; ``mlp_in`` are the Linears reading the MLP's input
    (gate/up), ``mlp_out`` those writing its output (down)."""

    model_config = ConfigDict(extra="forbid")

    embedding: str
    attn: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_o: str
    attn_head_dim: int | None = None
    mlp_in: list[str]
    mlp_out: list[str]
    lm_head: str

    @field_validator("mlp_in", "mlp_out", mode="before")
    @classmethod
    def _listify(cls, value):
        return [value] if isinstance(value, str) else value


class NormMapping(BaseModel):
    """A norm and the Linears reading its output; its scale is fused into them before rotating."""

    model_config = ConfigDict(extra="forbid")

    norm: str
    linears: list[str]

    @field_validator("linears", mode="before")
    @classmethod
    def _listify(cls, value):
        return [value] if isinstance(value, str) else value


_LLAMA_MAPPING = SpinQuantMapping(
    embedding="re:.*embed_tokens$",
    attn="re:.*self_attn$",
    attn_q="re:.*q_proj$",
    attn_k="re:.*k_proj$",
    attn_v="re:.*v_proj$",
    attn_o="re:.*o_proj$",
    mlp_in=["re:.*up_proj$", "re:.*gate_proj$"],
    mlp_out=["re:.*down_proj$"],
    lm_head="lm_head",
)
_LLAMA_NORMS = [
    NormMapping(norm="re:.*input_layernorm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    NormMapping(norm="re:.*post_attention_layernorm$", linears=["re:.*up_proj$", "re:.*gate_proj$"]),
    # the final norm: "model.norm" (not input_layernorm, not Qwen3's per-head q_norm/k_norm)
    NormMapping(norm=r"re:(.*\.)?norm$", linears=["lm_head"]),
]
# Qwen3's q_norm/k_norm normalise each head of q and k before RoPE: R1 acts on q_proj's input and R2 on v/o only,
# so they need no change; Qwen2's q/k/v biases are handled by the generic bias rules.
SUPPORTED_ARCHITECTURES = {
    name: (_LLAMA_MAPPING, _LLAMA_NORMS)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
}


def infer_mappings(model: nn.Module) -> tuple[SpinQuantMapping, list[NormMapping]]:
    """The mappings for a supported architecture (by class name), else a ValueError naming what is supported."""
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"SpinQuantModifier.mappings: cannot infer rotation mappings for architecture {arch}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Give `mappings` and `norm_mappings` explicitly for others"
        )
    mapping, norms = SUPPORTED_ARCHITECTURES[arch]
    return mapping.model_copy(deep=True), [n.model_copy(deep=True) for n in norms]


# -------------------------------------------------------------------------------------------------- modifier


@register_modifier
class SpinQuantModifier(Modifier):
    """SpinQuant rotations as a recipe modifier (llm-compressor's arguments, plus ``seed`` and learning options).

    :param rotations: any of "R1", "R2", "R3", "R4"
    :param transform_type: "hadamard" (deterministic), "random-hadamard" (Hadamard times random signs),
        "random-matrix" (Haar-random orthogonal)
    :param randomize: a distinct random rotation per layer for R2/R3/R4 (R1 is one matrix by construction)
    :param learnable: learn R1 and R2 with Cayley SGD on the quantized model's loss (needs calibration data and
        the whole model in memory)
    :param precision: dtype of the fusion arithmetic, "float64" (default) or "float32"
    :param transform_block_size: R1 and R4 become block-diagonal with blocks of this size (must divide
        hidden_size and intermediate_size); R2/R3 always use head_dim
    :param mappings / norm_mappings: where the rotations and norm fusions go; inferred for Llama, Mistral, Qwen2,
        Qwen3 when None
    :param seed: seed of the random transform types
    :param learning_rate, steps, momentum: Cayley SGD for ``learnable``
    :param learn_scales: with ``learnable``, also learn the exact per-channel scalings (module docstring) with
        Adam on their logarithms, at ``scale_learning_rate``
    :param objective: what ``learnable`` minimises: "kl" (default), KL(dense logits || quantized model's logits)
        on the calibration batches, or "ce", the quantized model's next-token loss (overfits the calibration
        text: on stories260K it gains on WikiText and loses on TinyStories)
    :param quantization: weight quantization the learned rotations optimise for (``QuantArgs`` fields; default
        4-bit symmetric per-channel)
    :param r1_init: with ``learnable``, where R1's learning starts: "transform" (the transform_type's matrix, as
        SpinQuant) or "identity": the model without R1, the norm scalings (``learn_scales``) starting at the norm
        weights, so R1 and the norms start exactly as in the unrotated model (R2, if planned, still starts at
        its transform) and R1 turns only as far as the calibration loss gains (on stories260K it ends lower than
        from Hadamard; bench/RESULTS.md)
    """

    statistic: ClassVar[str | None] = None  # the block pipeline needs no calibration statistic from us

    rotations: list[Literal["R1", "R2", "R3", "R4"]] = Field(default_factory=lambda: ["R1", "R2"])
    transform_type: Literal["hadamard", "random-hadamard", "random-matrix"] = "hadamard"
    randomize: bool = False
    learnable: bool = False
    precision: Literal["float64", "float32"] = "float64"
    transform_block_size: int | None = None
    mappings: SpinQuantMapping | None = None
    norm_mappings: list[NormMapping] | None = None
    seed: int = 0
    # SpinQuant's paper uses lr 1.5 for 100 steps on 7B models; on stories260K that diverges. With the scalings and
    # the KL objective, 150 steps (batches of 16 x 256 tokens) at 0.005 for both: WikiText-2 / TinyStories 189.7 /
    # 6.368 against plain W4 RTN's 243.4 / 6.368 (bench/quality_rotations.py); two other batch orders 195.6 / 6.327
    # and 173.0 / 6.278. 40 steps are not enough: 193.6 / 6.554, still losing to plain RTN on TinyStories.
    learning_rate: float = 0.005
    steps: int = 150
    momentum: float = 0.9
    learn_scales: bool = True
    objective: Literal["kl", "ce"] = "kl"
    scale_learning_rate: float = 0.005
    quantization: dict[str, Any] | None = None
    r1_init: Literal["transform", "identity"] = "transform"

    @field_validator("rotations", mode="before")
    @classmethod
    def _upper(cls, value):
        if isinstance(value, str):
            value = [value]
        return [v.upper() if isinstance(v, str) else v for v in value]

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.rotations)) != len(self.rotations):
            raise ValueError(f"rotations: each of {', '.join(ROTATIONS)} at most once; got {self.rotations}")
        if self.transform_block_size is not None and self.transform_block_size <= 0:
            raise ValueError(f"transform_block_size: must be a positive integer; got {self.transform_block_size}")
        if self.steps < 0 or self.learning_rate <= 0 or self.scale_learning_rate <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("steps must be >= 0, learning_rate and scale_learning_rate > 0, momentum in [0, 1)")
        if self.learnable and not {"R1", "R2"} & set(self.rotations):
            raise ValueError("learnable: learns R1 and R2; rotations must include at least one of them")
        if self.r1_init == "identity" and not (self.learnable and "R1" in self.rotations):
            raise ValueError("r1_init: 'identity' needs learnable: true and R1 in rotations (an R1 that is not "
                             "learned from the identity would stay the identity)")
        if self.quantization is not None:
            _quant_args(self.quantization)  # fail at recipe load, not after calibration
        return self

    def on_initialize(self, state, **kwargs) -> bool:
        return True

    # --- what the block pipeline asks (run_stage with this modifier is a no-op: the work is prepare_model) ---

    @property
    def target_patterns(self) -> list[str]:
        return []

    @property
    def ignore_patterns(self) -> list[str]:
        return []

    def check_layers(self, block_names: list[str]) -> None:
        return None

    def layer_sparsity(self, index: int, block_name: str) -> float:
        return 0.0

    def prepare_model(self, model: nn.Module, batches=None, quant_args=None) -> dict:
        """Rotate ``model`` in place (the hook ``oneshot`` calls before running a stage); returns the report."""
        return apply_spinquant(model, self, batches, quant_args=quant_args)


def _quant_args(options: dict[str, Any] | None):
    from service.algorithms.quantization import QuantArgs

    try:
        return QuantArgs(**(options or {}))
    except TypeError as exc:
        raise ValueError(f"quantization: {exc}; fields are num_bits, symmetric, strategy, group_size") from None


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class SpinQuantPlan:
    """Everything needed to rotate a model block by block: sizes, mappings and the rotation matrices (float64).

    ``r1`` is a ``RotationSpec`` (Hadamard kinds, fused with fwht) or a dense [hidden, hidden] float64 matrix
    (random-matrix, learned); ``r2`` holds one per layer, of head_dim (the same object for all layers unless
    randomized or learned); ``r3``/``r4`` are online specs per layer index. ``scales`` (learned, else None) are
    the logarithms of the per-channel scalings, float64: "attn"/"mlp" [layers, hidden], "ud" [layers,
    intermediate], "vo" [layers, num_kv_heads * head_dim] (module docstring)."""

    rotations: set[str]
    mapping: SpinQuantMapping
    norms: list[NormMapping]
    hidden: int
    intermediate: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    precision: torch.dtype
    r1: rot.Rotation | None = None
    r2: list[rot.Rotation] | None = None
    r3: list[rot.RotationSpec] | None = None
    r4: list[rot.RotationSpec] | None = None
    scales: dict[str, torch.Tensor] | None = None
    learned: dict = field(default_factory=dict)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def spinquant_plan(config, modifier: SpinQuantModifier, mapping: SpinQuantMapping | None = None,
                   norms: list[NormMapping] | None = None) -> SpinQuantPlan:
    """Sizes from the (text) config, mappings from the modifier or the arguments, and the rotations.

    :raises ValueError: a transform_block_size that does not divide a size it applies to, or a Hadamard kind
        for a size with no Hadamard matrix (the message names the field and what is allowed)
    """
    cfg = _text_config(config)
    mapping = mapping or modifier.mappings
    norms = norms or modifier.norm_mappings
    if mapping is None or norms is None:
        raise ValueError("SpinQuantModifier.mappings: no mappings given; use infer_mappings(model)")
    heads = cfg.num_attention_heads
    head_dim = mapping.attn_head_dim or getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    plan = SpinQuantPlan(
        rotations=set(modifier.rotations), mapping=mapping, norms=norms, hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size, head_dim=head_dim, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, num_layers=cfg.num_hidden_layers,
        precision=PRECISIONS[modifier.precision],
    )
    kind, seed, block = modifier.transform_type, modifier.seed, modifier.transform_block_size

    def spec(size: int, what: str, block_size: int | None, seed_: int) -> rot.RotationSpec:
        if block_size is not None and size % block_size:
            raise ValueError(f"transform_block_size: {block_size} must divide {what} {size}")
        return rot.RotationSpec(kind, size, block_size or size, seed_)

    def per_layer(offset: int) -> list[int]:
        return [seed + offset + (i if modifier.randomize else 0) for i in range(plan.num_layers)]

    def offline(r: rot.RotationSpec) -> rot.Rotation:
        # Hadamard kinds stay specs (fused with fwht); a random matrix is drawn once and reused
        return r.matrix() if r.kind == "random-matrix" else r

    if "R1" in plan.rotations:
        plan.r1 = offline(spec(plan.hidden, "hidden_size (R1)", block, seed))
        if modifier.learnable and modifier.r1_init == "identity":
            plan.r1 = torch.eye(plan.hidden, dtype=torch.float64)
    if "R2" in plan.rotations:
        cache: dict[int, rot.Rotation] = {}
        plan.r2 = [cache.setdefault(s, offline(spec(head_dim, "head_dim (R2)", None, s))) for s in per_layer(1000)]
    if "R3" in plan.rotations:
        plan.r3 = [spec(head_dim, "head_dim (R3)", None, s) for s in per_layer(2000)]
    if "R4" in plan.rotations:
        plan.r4 = [spec(plan.intermediate, "intermediate_size (R4)", block, s) for s in per_layer(3000)]
    return plan


# ------------------------------------------------------------------------------------------------- rotating


def _named(root: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for local, module in root.named_modules():
        name = f"{prefix}.{local}" if prefix and local else (prefix or local)
        out.append((name, module))
    return out


def _find(named: list[tuple[str, nn.Module]], pattern: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in named if n and matches(n, m, pattern)]


def _one(named, pattern: str, field_name: str, where: str) -> nn.Module:
    found = _find(named, pattern)
    if len(found) != 1:
        raise ValueError(
            f"SpinQuantModifier.mappings.{field_name}: {pattern!r} matches {len(found)} modules in {where} "
            f"(need exactly 1){': ' + ', '.join(n for n, _ in found[:4]) if found else ''}"
        )
    return found[0][1]


def _check_norm(norm: nn.Module, name: str) -> None:
    if isinstance(norm, nn.LayerNorm):
        # a LayerNorm model also needs every residual writer's output centred, which these mappings do not cover
        raise ValueError(
            f"SpinQuantModifier.norm_mappings: {name} is a LayerNorm; only RMSNorm models are supported "
            "(centring the residual stream would be needed)"
        )


def _fuse_norms(named, plan: SpinQuantPlan, where: str, defer: bool = False) -> tuple[int, dict]:
    """Fuse the norms found in ``named`` into their Linears. With ``defer``, a bias-free norm's scale is only
    taken out (norm weight set to ones) and returned per Linear, for ``rotate_input(..., input_scale=)`` to fuse
    in the same pass as R1. Returns (norms fused, {linear: scale})."""
    fused = 0
    deferred: dict[nn.Module, torch.Tensor] = {}
    for mapping in plan.norms:
        for norm_name, norm in _find(named, mapping.norm):
            if isinstance(norm, nn.Linear) or getattr(norm, "weight", None) is None or norm.weight.dim() != 1:
                continue
            # the linears of this norm are the ones matched in the same scope (block / outside blocks)
            linears = [m for p in mapping.linears for _, m in _find(named, p)]
            if not linears:
                raise ValueError(f"SpinQuantModifier.norm_mappings: {norm_name} has no linears in {where}")
            _check_norm(norm, norm_name)
            if defer and getattr(norm, "bias", None) is None and not any(lin in deferred for lin in linears):
                scale = norm.weight.detach().clone()
                deferred.update({lin: scale for lin in linears})
                norm.weight.fill_(1.0)
            else:
                rot.fuse_norm_linears(norm, linears, precision=plan.precision)
            fused += 1
    return fused, deferred


def _apply_leftover_scales(deferred: dict, precision: torch.dtype) -> None:
    for linear, scale in deferred.items():  # norm linears that R1 does not read (custom mappings): fuse alone
        rot.rotate_input(linear, None, precision=precision, input_scale=scale)


def _scale_sites(named, plan: SpinQuantPlan, where: str) -> dict[str, Any]:
    """Full names of the modules one block's learned scalings touch: "attn" and "mlp" are (norm, [its readers])
    for the norm read by q_proj and the one read by the mlp_in Linears; "up" and "down" list the up_proj among
    mlp_in (by name: SwiGLU is linear in up, not in gate) and the mlp_out Linears; "v" and "o" name v/o_proj."""
    m = plan.mapping
    q = _one(named, m.attn_q, "attn_q", where)
    mlp_in = [(n, mod) for p in m.mlp_in for n, mod in _find(named, p)]
    sites: dict[str, Any] = {}
    for mapping in plan.norms:
        for norm_name, norm in _find(named, mapping.norm):
            if isinstance(norm, nn.Linear) or getattr(norm, "weight", None) is None or norm.weight.dim() != 1:
                continue
            readers = [(n, mod) for p in mapping.linears for n, mod in _find(named, p)]
            if any(mod is q for _, mod in readers):
                sites["attn"] = (norm_name, [n for n, _ in readers])
            elif any(mod is mi for _, mod in readers for _, mi in mlp_in):
                sites["mlp"] = (norm_name, [n for n, _ in readers])
    sites["up"] = [n for n, _ in mlp_in if n.endswith("up_proj")]
    sites["down"] = [n for p in m.mlp_out for n, _ in _find(named, p)]
    sites["v"] = next(n for n, _ in _find(named, m.attn_v))
    sites["o"] = next(n for n, _ in _find(named, m.attn_o))
    if "attn" not in sites or "mlp" not in sites or len(sites["up"]) != 1:
        raise ValueError(f"SpinQuantModifier.learn_scales: needs the norm read by q_proj, the norm read by mlp_in "
                         f"and one up_proj among mlp_in in {where}; set learn_scales: false for this model")
    return sites


def _scale_tensors(tensors: dict[str, torch.Tensor], sites: dict[str, Any], log_scales: dict[str, torch.Tensor],
                   plan: SpinQuantPlan) -> dict[str, torch.Tensor]:
    """One block's parameters after its scalings (module docstring); the same function of the weights whether
    they are being learned or fused. ``tensors`` maps parameter names (``<module>.weight``/``.bias``, the two
    norms' weights included) to tensors in one float dtype; ``log_scales`` holds this layer's logarithms, "attn"
    and "mlp" [hidden], "ud" [intermediate], "vo" [num_kv_heads * head_dim]. Returns a new dict (differentiable
    in both arguments); every scaling is exact for any log-scales."""
    out = dict(tensors)
    dtype = next(iter(tensors.values())).dtype
    exp = {k: v.exp().to(dtype) for k, v in log_scales.items()}
    for key in ("attn", "mlp"):  # the norm's output is n(x) * g / s, its readers see it times s
        norm, readers = sites[key]
        out[norm + ".weight"] = out[norm + ".weight"] / exp[key]
        for name in readers:
            out[name + ".weight"] = out[name + ".weight"] * exp[key]
    groups = plan.num_heads // plan.num_kv_heads
    # o_proj's input of query head i is the value of kv head i // groups, so u repeats per group
    u_o = exp["vo"].view(plan.num_kv_heads, 1, plan.head_dim).expand(-1, groups, -1).reshape(-1)
    for writers, readers, t, t_in in ((sites["up"], sites["down"], exp["ud"], exp["ud"]),
                                      ([sites["v"]], [sites["o"]], exp["vo"], u_o)):
        for name in writers:  # output rows (and bias) / t
            out[name + ".weight"] = out[name + ".weight"] / t[:, None]
            if name + ".bias" in out:
                out[name + ".bias"] = out[name + ".bias"] / t
        for name in readers:  # input columns * t
            out[name + ".weight"] = out[name + ".weight"] * t_in
    return out


@torch.no_grad()
def _fuse_scales(named, plan: SpinQuantPlan, index: int, where: str) -> None:
    """Fuse layer ``index``'s learned scalings into the block's norms and Linears, in the fusion precision."""
    sites = _scale_sites(named, plan, where)
    modules = dict(named)
    names = [sites["attn"][0], sites["mlp"][0], *sites["attn"][1], *sites["mlp"][1], *sites["up"], *sites["down"],
             sites["v"], sites["o"]]
    params = {f"{n}.{a}": getattr(modules[n], a) for n in dict.fromkeys(names) for a in ("weight", "bias")
              if getattr(modules[n], a, None) is not None}
    tensors = {k: p.detach().to(plan.precision) for k, p in params.items()}
    scaled = _scale_tensors(tensors, sites, {k: v[index] for k, v in plan.scales.items()}, plan)
    for key, p in params.items():
        p.copy_(scaled[key])


def _outside(model: nn.Module, blocks: list[tuple[str, nn.Module]] | None) -> list[tuple[str, nn.Module]]:
    """Named modules of the model that are not inside a decoder block."""
    from service.recipes.targets import find_blocks

    block_names = [n for n, _ in (blocks if blocks is not None else find_blocks(model, None))]
    return [(n, m) for n, m in _named(model, "")
            if n and not any(n == b or n.startswith(b + ".") or b.startswith(n + ".") for b in block_names)]


@torch.no_grad()
def rotate_outside(model: nn.Module, plan: SpinQuantPlan, blocks=None) -> dict:
    """With R1: untie the embeddings, fuse the final norm into lm_head, and apply R1 to embeddings (output) and
    lm_head (input); without R1, nothing outside the blocks changes. Touches no decoder block. Returns a small
    report."""
    if plan.r1 is None:  # only R1 needs the norms fused and the head untied; fusing costs W4 quality for nothing
        return {"untied": False, "norms_fused": 0}
    untied = rot.untie_word_embeddings(model)
    named = _outside(model, blocks)
    fused, deferred = _fuse_norms(named, plan, "the non-block modules", defer=True)
    embedding = _one(named, plan.mapping.embedding, "embedding", "the non-block modules")
    head = _one(named, plan.mapping.lm_head, "lm_head", "the non-block modules")
    rot.rotate_embedding(embedding, plan.r1, precision=plan.precision)
    rot.rotate_input(head, plan.r1, precision=plan.precision, input_scale=deferred.pop(head, None))
    _apply_leftover_scales(deferred, plan.precision)
    return {"untied": untied, "norms_fused": fused}


@torch.no_grad()
def rotate_block(block: nn.Module, name: str, index: int, plan: SpinQuantPlan) -> dict:
    """Rotate one decoder layer in place: fuse its norms (with R1 only), R1 on residual readers/writers, R2 on
    v/o per head, the plan's learned scalings (if any; the norms' weights become 1/s), R4 fused into down_proj
    with its online hook (after the scalings: R4's inverse then absorbs down_proj's scaled columns), R3 marked on
    the attention module (``finish_online`` switches the model's attention function). ``name`` is the block's
    full dotted name, for the mapping patterns."""
    named = _named(block, name)
    where = f"block {name}"
    m = plan.mapping
    fused, deferred = _fuse_norms(named, plan, where, defer=True) if plan.r1 is not None else (0, {})
    q, k, v, o = (_one(named, getattr(m, f), f, where) for f in ("attn_q", "attn_k", "attn_v", "attn_o"))
    mlp_in = [mod for p in m.mlp_in for _, mod in _find(named, p)]
    mlp_out = [mod for p in m.mlp_out for _, mod in _find(named, p)]
    if not mlp_in or not mlp_out:
        raise ValueError(f"SpinQuantModifier.mappings.mlp_in/mlp_out: no match in {where}")
    precision = plan.precision
    if plan.r1 is not None:
        for linear in (q, k, v, *mlp_in):
            rot.rotate_input(linear, plan.r1, precision=precision, input_scale=deferred.pop(linear, None))
        for linear in (o, *mlp_out):
            rot.rotate_output(linear, plan.r1, precision=precision)
    _apply_leftover_scales(deferred, precision)
    if plan.r2 is not None:
        rot.rotate_heads_output(v, plan.r2[index], plan.head_dim, precision=precision)
        rot.rotate_heads_input(o, plan.r2[index], plan.head_dim, plan.num_kv_heads, precision=precision)
    if plan.scales is not None:
        _fuse_scales(named, plan, index, where)
    if plan.r4 is not None:
        for down in mlp_out:
            online.attach_r4(down, plan.r4[index], precision=precision)
    if plan.r3 is not None:
        online.mark_r3(_one(named, m.attn, "attn", where), plan.r3[index])
    return {"norms_fused": fused}


def finish_online(model: nn.Module, plan: SpinQuantPlan) -> dict:
    """Wrap the model's attention function for R3 (if planned); returns the online transforms' description."""
    if plan.r3 is not None:
        online.enable_r3_attention(model)
    return online.online_transforms_description(model)


def apply_spinquant(model: nn.Module, modifier: SpinQuantModifier, batches=None, *, quant_args=None) -> dict:
    """Rotate ``model`` in place as ``modifier`` says; returns a report (what was done, the online transforms'
    description for the checkpoint's transform_config, seconds, and the learning curve when learnable).

    ``learnable`` needs ``batches`` (dicts with ``input_ids`` [batch, seq]) and the whole model in memory: the
    loss of the quantized model depends on every rotated weight at once. ``quant_args`` (a ``QuantArgs``, e.g.
    from the recipe's quantization modifier) overrides ``modifier.quantization``.
    """
    from service.recipes.targets import find_blocks

    started = time.perf_counter()
    if modifier.mappings is not None and modifier.norm_mappings is not None:
        mapping, norms = modifier.mappings, modifier.norm_mappings
    else:
        inferred = infer_mappings(model)
        mapping, norms = modifier.mappings or inferred[0], modifier.norm_mappings or inferred[1]
    plan = spinquant_plan(model.config, modifier, mapping, norms)
    blocks = find_blocks(model, None)
    if modifier.learnable:
        if not batches:
            raise ValueError("dataset: SpinQuantModifier with learnable: true needs calibration data")
        args = quant_args if quant_args is not None else _quant_args(modifier.quantization)
        plan.learned = learn_rotations(model, plan, batches, args, steps=modifier.steps,
                                       learning_rate=modifier.learning_rate, momentum=modifier.momentum,
                                       blocks=blocks, learn_scales=modifier.learn_scales,
                                       scale_learning_rate=modifier.scale_learning_rate,
                                       objective=modifier.objective, scales_from_norms=modifier.r1_init == "identity")
    report = rotate_outside(model, plan, blocks)
    for index, (name, block) in enumerate(blocks):
        report["norms_fused"] += rotate_block(block, name, index, plan)["norms_fused"]
    online = finish_online(model, plan)
    return {
        "rotations": sorted(plan.rotations),
        "transform_type": modifier.transform_type,
        **report,
        "online_transforms": online,
        "learned": plan.learned,
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------- learning


def cayley_sgd_step(x: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, lr: float,
                    momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step with momentum on the orthogonal group (Li, Li & Todorovic 2020, Alg. 1/2, as used by
    SpinQuant), for square X [n, n] float64.

    The Riemannian gradient is ``A X`` with the skew matrix ``A = G X^T - X G^T``; the momentum is kept as a
    skew matrix (``M <- momentum * M + A``; a sum of skew matrices is skew, so no re-projection is needed) and
    the step is the Cayley transform ``X <- (I + a/2 M)^{-1} (I - a/2 M) X``, computed exactly with a solve
    (the paper's fixed-point iteration approximates it): the result is orthogonal to float64 rounding, so R
    never drifts off the manifold however many steps are taken. As in the paper, the step is capped,
    ``a = min(lr, 1 / ||M||_F)``, so one step never turns R by more than about a radian. Returns (new X, new M).
    """
    a = grad @ x.T - x @ grad.T
    m = momentum * momentum_buf + a
    step = min(lr, 1.0 / (float(m.norm()) + 1e-12))
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    x_new = torch.linalg.solve(eye + (step / 2) * m, (eye - (step / 2) * m) @ x)
    return x_new, m


def _rotated_parameters(model, plan, named_blocks, r1, r2s, quantize, log_scales=None) -> dict[str, torch.Tensor]:
    """Model parameters with R1/R2 applied (as differentiable functions of r1 [h, h] and r2s [layers, d, d]) and
    the decoder Linears fake-quantized. Norms must already be fused when R1 is given (their weights are ones).
    With ``log_scales`` (the plan's ``scales`` layout, may require grad) the per-channel scalings follow R1/R2,
    as in rotate_block, and the two norms' weights of each block are returned too. With R4 planned, mlp_out
    weights also carry R4, after the scalings (its online hook must be attached, unfused, for the forward to
    match)."""
    # Built in the fusion precision and cast once, like rotate_block, so the weights quantized here are (to an
    # ulp) the ones apply_spinquant writes; a float32 product moves enough of them across RTN steps to matter.
    dtype, work = next(model.parameters()).dtype, plan.precision
    out: dict[str, torch.Tensor] = {}
    m = plan.mapping
    r1 = r1.to(work) if r1 is not None else None
    outside = _outside(model, named_blocks)
    parameters = dict(model.named_parameters())
    if r1 is not None:
        for field_name in ("embedding", "lm_head"):
            name = next(n for n, mod in outside if matches(n, mod, getattr(m, field_name)))
            w = parameters[name + ".weight"]
            out[name + ".weight"] = (w.to(work) @ r1).to(dtype)
    for index, (block_name, block) in enumerate(named_blocks):
        named = _named(block, block_name)

        def name_of(pattern):
            return [n for n, _ in _find(named, pattern)]

        readers = name_of(m.attn_q) + name_of(m.attn_k) + name_of(m.attn_v) + [n for p in m.mlp_in for n in name_of(p)]
        mlp_out = [n for p in m.mlp_out for n in name_of(p)]
        writers = name_of(m.attn_o) + mlp_out
        r2 = r2s[index].to(work) if r2s is not None else None
        modules = dict(named)
        linears = set(readers + writers)
        tensors: dict[str, torch.Tensor] = {}
        for name in readers + writers:
            linear = modules[name]
            w = linear.weight.to(work)
            b = linear.bias.to(work) if linear.bias is not None else None
            if r1 is not None:
                w = w @ r1 if name in readers else r1.T @ w
                if b is not None and name in writers:
                    b = b @ r1
            if r2 is not None and name in name_of(m.attn_v):
                big = rot.head_rotation(r2, w.shape[0] // plan.head_dim)
                w = big.T @ w
                b = b @ big if b is not None else None
            if r2 is not None and name in name_of(m.attn_o):
                w = w @ rot.head_rotation(r2, w.shape[1] // plan.head_dim)
            tensors[name + ".weight"] = w
            if b is not None:
                tensors[name + ".bias"] = b
        if log_scales is not None:
            sites = _scale_sites(named, plan, f"block {block_name}")
            for norm in (sites["attn"][0], sites["mlp"][0]):
                tensors[norm + ".weight"] = parameters[norm + ".weight"].to(work)
            tensors = _scale_tensors(tensors, sites, {k: v[index] for k, v in log_scales.items()}, plan)
        for key, value in tensors.items():
            module_name, kind = key.rsplit(".", 1)
            if kind == "weight" and module_name in linears:
                if plan.r4 is not None and module_name in mlp_out:
                    value = plan.r4[index].apply(value)  # R4's fused inverse (the online hook is attached)
                out[key] = quantize(value.to(dtype))
            else:
                out[key] = value.to(dtype)
    return out


def learn_rotations(model: nn.Module, plan: SpinQuantPlan, batches, quant_args, *, steps: int,
                    learning_rate: float, momentum: float = 0.9, blocks=None, learn_scales: bool = False,
                    scale_learning_rate: float = 0.005, objective: Literal["kl", "ce"] = "ce",
                    scales_from_norms: bool = False) -> dict:
    """Learn R1 (and per-layer R2), and with ``learn_scales`` the per-channel scalings, for the model whose
    decoder Linears are fake-quantized with ``quant_args`` (straight-through gradients), starting from the plan's
    rotations and scalings of 1. R moves by ``cayley_sgd_step``; the log-scales by Adam at ``scale_learning_rate``.
    The loss (``objective``): "ce", the quantized model's next-token loss, or "kl", KL(dense || quantized) of the
    next-token distributions, mean over tokens, the dense logits coming from the same rotated parameters with no
    quantizer. Prepares the model first (untie, fuse norms with R1: exact and idempotent); writes the learned
    matrices (and ``scales``) into ``plan`` (float64) and returns ``{"losses": [per step], "initial_loss",
    "final_loss", "objective", "steps", "seconds", "r1_moved"}``, the initial/final losses being means over the
    same first (up to 4) batches, ``r1_moved`` how far R1 turned (Frobenius distance, and up to hidden size 4096
    the mean and largest rotation angle in radians; None without R1). The defaults here (no scalings, "ce") are
    the behaviour before scalings existed; the modifier passes its own (scalings, "kl"). ``scales_from_norms``
    (with scalings and R1): the "attn"/"mlp" scalings start at 1/|g| of the norms they belong to instead of 1,
    which puts each norm's weight back where it was before fusing: with an identity R1 the norms and their readers
    start as in the unrotated model (signs of g stay in the readers' columns, which symmetric quantization does
    not see).

    Needs the whole model in memory and autograd through it: the loss depends on every rotated weight.
    ``batches`` are dicts with ``input_ids``; steps cycle through them. A planned R4 is in the loop (fixed);
    R3 is not (it changes no Linear). Activation fake-quant hooks already on the model (e.g.
    ``attach_activation_quantization`` for W4A4) stay active, so the rotations are then learned for that too
    (the "kl" reference then also passes through them).
    """
    import torch.nn.functional as F
    from torch.func import functional_call

    from service.algorithms.quantization import fake_quantize
    from service.recipes.targets import find_blocks

    if objective not in ("kl", "ce"):
        raise ValueError(f"objective: 'kl' or 'ce'; got {objective!r}")
    started = time.perf_counter()
    blocks = blocks if blocks is not None else find_blocks(model, None)
    norm_weights = None
    if scales_from_norms and learn_scales and plan.r1 is not None:
        norm_weights = {}  # the norms' weights before fusing, per site and layer
        for name, block in blocks:
            sites = _scale_sites(_named(block, name), plan, f"block {name}")
            for key in ("attn", "mlp"):
                weight = block.get_submodule(sites[key][0][len(name) + 1:]).weight
                norm_weights.setdefault(key, []).append(weight.detach().to(torch.float64).abs().clone())
    with torch.no_grad():
        rot.untie_word_embeddings(model)
        if plan.r1 is not None:
            _fuse_norms(_outside(model, blocks), plan, "the non-block modules")
            for name, block in blocks:
                _fuse_norms(_named(block, name), plan, f"block {name}")  # not deferred: learning needs them fused

    r1 = rot.dense(plan.r1).clone() if plan.r1 is not None else None
    r2 = torch.stack([rot.dense(r) for r in plan.r2]) if plan.r2 is not None else None  # [layers, d, d]
    state = {"r1": (r1, torch.zeros_like(r1) if r1 is not None else None),
             "r2": (r2, torch.zeros_like(r2) if r2 is not None else None)}
    device = next(model.parameters()).device
    thetas, adam = None, None
    if learn_scales:
        sizes = {"attn": plan.hidden, "mlp": plan.hidden, "ud": plan.intermediate,
                 "vo": plan.num_kv_heads * plan.head_dim}
        thetas = {k: torch.zeros(plan.num_layers, n, dtype=torch.float64, device=device) for k, n in sizes.items()}
        if norm_weights is not None:
            for key, weights in norm_weights.items():
                tiny = torch.finfo(torch.float32).tiny  # a zero norm weight: its channel is dead either way
                thetas[key] = -torch.stack(weights).to(device).clamp_min(tiny).log()
        thetas = {k: v.requires_grad_(True) for k, v in thetas.items()}
        adam = torch.optim.Adam(list(thetas.values()), lr=scale_learning_rate)
    training = model.training
    model.eval()  # no dropout; gradients still flow
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    batches = list(batches)
    # R4 (fixed) is part of the quantized model being optimised for, as in SpinQuant: hook it unfused here, the
    # weights get it inside _rotated_parameters; rotate_block attaches it for good afterwards.
    r4_modules = []
    if plan.r4 is not None:
        for index, (name, block) in enumerate(blocks):
            for pattern in plan.mapping.mlp_out:
                for _, module in _find(_named(block, name), pattern):
                    online.attach_r4(module, plan.r4[index], fuse=False)
                    r4_modules.append(module)

    # With the plain STE a scaling's gradient is the unquantized weight's; scale_grad also lets it see that scaling
    # a row moves the row's quantization step (max|w| / 7.5) with it (test_fake_quantize_scale_grad_...).
    def quantize(w):
        return fake_quantize(w, quant_args, scale_grad=learn_scales)

    def loss_of(r1_, r2_, th, batch) -> torch.Tensor:
        ids = batch["input_ids"]
        params = _rotated_parameters(model, plan, blocks, r1_, r2_, quantize, th)
        if objective == "ce":
            return functional_call(model, params, args=(), kwargs={"input_ids": ids, "labels": ids},
                                   strict=False).loss
        logits = functional_call(model, params, args=(), kwargs={"input_ids": ids}, strict=False).logits
        with torch.no_grad():  # any exact rotation gives the dense function; the current one is at hand
            ref = functional_call(model, _rotated_parameters(model, plan, blocks, r1_, r2_, lambda w: w), args=(),
                                  kwargs={"input_ids": ids}, strict=False).logits
        dense_lp = F.log_softmax(ref.float(), dim=-1).flatten(0, -2)
        quant_lp = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
        return F.kl_div(quant_lp, dense_lp, log_target=True, reduction="batchmean")

    def fixed(th):
        return None if th is None else {k: v.detach() for k, v in th.items()}

    losses = []
    held = batches[: min(len(batches), 4)]  # the loss before/after is measured on the same batches
    try:
        with torch.no_grad():
            initial = [loss_of(state["r1"][0], state["r2"][0], fixed(thetas), b).item() for b in held]
        for step in range(steps):
            batch = batches[step % len(batches)]
            leaves = {k: v[0].detach().requires_grad_(True) for k, v in state.items() if v[0] is not None}
            loss = loss_of(leaves.get("r1"), leaves.get("r2"), thetas, batch)
            loss.backward()
            losses.append(loss.item())
            if adam is not None:
                adam.step()
                adam.zero_grad()
            with torch.no_grad():
                for key, leaf in leaves.items():
                    x, buf = state[key]
                    if key == "r1":
                        state[key] = cayley_sgd_step(x, leaf.grad, buf, learning_rate, momentum)
                    else:  # one Cayley step per layer's R2
                        pairs = [cayley_sgd_step(x[i], leaf.grad[i], buf[i], learning_rate, momentum)
                                 for i in range(x.shape[0])]
                        state[key] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        with torch.no_grad():
            final = [loss_of(state["r1"][0], state["r2"][0], fixed(thetas), b).item() for b in held]
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(training)
        for module in r4_modules:
            online.detach_r4(module)
    moved = None
    if state["r1"][0] is not None:
        # How far R1 turned from where it started: angles are those of the rotation R1_start^T R1 (an eigensolve,
        # skipped where it would cost more than the report is worth)
        moved = {"frobenius": float((state["r1"][0] - r1).norm())}
        if r1.shape[0] <= 4096:
            angles = torch.linalg.eigvals(r1.T @ state["r1"][0]).angle().abs()
            moved.update(mean_angle=float(angles.mean()), max_angle=float(angles.max()))
        plan.r1 = state["r1"][0]
    if state["r2"][0] is not None:
        plan.r2 = list(state["r2"][0])
    if thetas is not None:
        plan.scales = fixed(thetas)
    return {"losses": losses, "initial_loss": sum(initial) / len(initial), "final_loss": sum(final) / len(final),
            "objective": objective, "steps": steps, "seconds": time.perf_counter() - started, "r1_moved": moved}
