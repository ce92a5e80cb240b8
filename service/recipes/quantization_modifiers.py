"""The quantization modifiers a recipe names: QuantizationModifier (round-to-nearest) and GPTQModifier.

Their arguments are llm-compressor's (``targets``, ``ignore``, ``scheme``, ``config_groups``, GPTQ's
``block_size``, ``dampening_frac``, ``actorder``, ``offload_hessians``, ``sequential_targets``) and the
math is in pure functions (service.algorithms.quantization, service.algorithms.gptq). They plug into the block
pipeline the way the pruning modifiers do: the pipeline asks which modules of a block they target and then calls
``compress_module`` with the module's calibration statistic (a Hessian for GPTQ, nothing for RTN).

After ``compress_module`` a Linear holds its fake-quantized (dequantized) weight and carries what the
export needs: buffers ``weight_scale``, ``weight_zero_point`` (and ``weight_g_idx`` with actorder
"group"), and attributes ``quantization_args`` / ``input_quantization_args`` (QuantArgs or None).
Activation quantization is evaluated with forward pre-hooks (:func:`attach_activation_quantization`).

Only integer quantization is supported (``type: int``); float formats (FP8, NVFP4, MXFP4) are refused
with the list of accepted values, as are output-activation and KV-cache schemes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from service.algorithms.gptq import ACTORDERS, gptq_quantize
from service.algorithms.quantization import QuantArgs, fake_quantize, fake_quantize_activations, quantization_params
from service.recipes.layerwise_modifier import HessianSolverModifier, LayerwiseModifier
from service.recipes.recipe import register_modifier
from service.recipes.targets import as_patterns, compressible_modules, matches_any, set_weight_matrix, weight_matrix

log = logging.getLogger(__name__)


def _weights(bits: int, strategy: str = "group", group_size: int | None = 128) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group_size}


_A8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
_A4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

# compressed-tensors 0.20's integer presets (quant_scheme.PRESET_SCHEMES): WxA16 / WxAy use int weights in
# groups of 128 with per-token dynamic int activations; W8A8 (alias INT8) uses per-channel weights.
PRESET_SCHEMES: dict[str, dict] = {
    **{f"W{b}A16": {"weights": _weights(b)} for b in range(2, 9)},
    **{f"W{b}A8": {"weights": _weights(b), "input_activations": _A8} for b in range(2, 8)},
    **{f"W{b}A4": {"weights": _weights(b), "input_activations": _A4} for b in range(2, 5)},
    "W4A16_ASYM": {"weights": {**_weights(4), "symmetric": False}},
    "W8A8": {"weights": _weights(8, "channel", None), "input_activations": _A8},
    "INT8": {"weights": _weights(8, "channel", None), "input_activations": _A8},
}

_ARG_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder", "observer",
             "block_structure", "scale_dtype", "zp_dtype")
_OBSERVERS = ("minmax", "memoryless_minmax", "static_minmax")
_GROUP_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")


def quant_args_from_dict(data: Any, field: str) -> tuple[QuantArgs, str | None]:
    """compressed-tensors ``QuantizationArgs`` as a dict -> (QuantArgs, actorder). Errors name ``field``.

    ``strategy`` is inferred like compressed-tensors when omitted: no group_size -> "tensor",
    group_size > 0 -> "group", group_size == -1 -> "channel".
    """
    if isinstance(data, QuantArgs):
        return data, None
    if not isinstance(data, dict):
        raise ValueError(f"{field} must be a mapping of quantization arguments (got {data!r})")
    unknown = sorted(set(data) - set(_ARG_KEYS))
    if unknown:
        raise ValueError(f"{field}: unknown keys {unknown}; allowed: {', '.join(_ARG_KEYS)}")
    kind = str(data.get("type", "int")).lower()
    if kind != "int":
        raise ValueError(f"{field}.type must be 'int' (float formats are not supported); got {data['type']!r}")
    for key in ("block_structure", "scale_dtype", "zp_dtype"):
        if data.get(key) is not None:
            raise ValueError(f"{field}.{key} is not supported; allowed: null")
    observer = data.get("observer")
    if observer is not None and observer not in _OBSERVERS:
        raise ValueError(f"{field}.observer must be one of {', '.join(_OBSERVERS)} or null; got {observer!r}")
    group_size = data.get("group_size")
    strategy = data.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    strategy = str(strategy).lower()
    if strategy == "channel" and group_size == -1:
        group_size = None
    actorder = data.get("actorder")
    if actorder is not None and actorder not in ACTORDERS:
        raise ValueError(f"{field}.actorder must be one of {', '.join(ACTORDERS)} or null; got {actorder!r}")
    try:
        args = QuantArgs(
            num_bits=data.get("num_bits", 8), symmetric=bool(data.get("symmetric", True)), strategy=strategy,
            group_size=group_size, dynamic=bool(data.get("dynamic", False)),
        )
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None
    return args, actorder


class QuantGroup:
    """One resolved config group: which modules, and how their weights and inputs are quantized."""

    def __init__(self, name: str, targets: list[str], weights: QuantArgs | None, inputs: QuantArgs | None,
                 actorder: str | None):
        self.name, self.targets, self.weights, self.inputs, self.actorder = name, targets, weights, inputs, actorder


def resolve_groups(scheme: Any, config_groups: dict | None, targets: list[str]) -> list[QuantGroup]:
    """``scheme`` (a preset name, or {preset: targets}) or ``config_groups`` -> groups, first match wins."""
    groups: list[QuantGroup] = []
    if config_groups is not None:
        for name, body in config_groups.items():
            field = f"config_groups.{name}"
            if not isinstance(body, dict):
                raise ValueError(f"{field} must be a mapping with keys {', '.join(_GROUP_KEYS)}")
            unknown = sorted(set(body) - set(_GROUP_KEYS))
            if unknown:
                raise ValueError(f"{field}: unknown keys {unknown}; allowed: {', '.join(_GROUP_KEYS)}")
            if body.get("output_activations") is not None:
                raise ValueError(f"{field}.output_activations is not supported; allowed: null")
            group_targets = as_patterns(body.get("targets"))
            if not group_targets:
                raise ValueError(f"{field}.targets must name at least one module pattern")
            groups.append(_group(name, group_targets, body.get("weights"), body.get("input_activations"), field))
        return groups
    items = {scheme: targets} if isinstance(scheme, str) else dict(scheme)
    for preset, preset_targets in items.items():
        key = str(preset).upper()
        if key not in PRESET_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(PRESET_SCHEMES)}; got {preset!r}")
        body = PRESET_SCHEMES[key]
        groups.append(_group(f"group_{len(groups)}", as_patterns(preset_targets), body.get("weights"),
                             body.get("input_activations"), f"scheme.{preset}"))
    return groups


def _group(name: str, targets: list[str], weights: Any, inputs: Any, field: str) -> QuantGroup:
    w_args, actorder = quant_args_from_dict(weights, f"{field}.weights") if weights is not None else (None, None)
    if w_args is not None and w_args.dynamic:
        raise ValueError(f"{field}.weights.dynamic must be false (weights are quantized once)")
    i_args = None
    if inputs is not None:
        i_args, i_order = quant_args_from_dict(inputs, f"{field}.input_activations")
        if i_order is not None:
            raise ValueError(f"{field}.input_activations.actorder is not allowed (weights only)")
        if not i_args.dynamic:
            raise ValueError(f"{field}.input_activations.dynamic must be true (static activation scales are not "
                             "supported)")
        if i_args.strategy == "channel":
            raise ValueError(f"{field}.input_activations.strategy must be one of token, tensor, group")
    return QuantGroup(name, targets, w_args, i_args, actorder)


class QuantizationModifierBase(LayerwiseModifier):
    """Arguments and pipeline interface shared by QuantizationModifier and GPTQModifier."""

    statistic: ClassVar[str | None] = None

    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    scheme: str | dict[str, str | list[str]] | None = None
    config_groups: dict[str, Any] | None = None
    kv_cache_scheme: dict[str, Any] | None = None
    sequential_targets: str | list[str] | None = None

    _groups: list[QuantGroup] = PrivateAttr(default_factory=list)

    @field_validator("kv_cache_scheme")
    @classmethod
    def _no_kv_cache(cls, value):
        if value is not None:
            raise ValueError("kv_cache_scheme is not supported; allowed: null")
        return value

    @model_validator(mode="after")
    def _resolve(self):
        if (self.scheme is None) == (self.config_groups is None):
            raise ValueError("give exactly one of scheme (a preset name: "
                             f"{', '.join(PRESET_SCHEMES)}) or config_groups")
        self._groups = resolve_groups(self.scheme, self.config_groups, as_patterns(self.targets))
        return self

    # --- what the pipeline asks ------------------------------------------------------------------------------

    @property
    def groups(self) -> list[QuantGroup]:
        return self._groups

    @property
    def target_patterns(self) -> list[str]:
        return [p for group in self._groups for p in group.targets]

    @property
    def ignore_patterns(self) -> list[str]:
        return as_patterns(self.ignore)

    def group_for(self, name: str, module: nn.Module) -> QuantGroup:
        for group in self._groups:
            if matches_any(name, module, group.targets):
                return group
        raise ValueError(f"{name} matches none of the config groups' targets")

    def compress_module(self, name: str, module: nn.Module, statistic: Any, sparsity: float) -> dict:
        """Quantize one Linear in place; returns its report entry."""
        group = self.group_for(name, module)
        weight = weight_matrix(module).detach()
        # Sparsity is what pruning left (the zeros quantization keeps), counted before rounding: weights that merely
        # round to zero (about 18% of an int4 per-channel matrix) are not pruned and save nothing in the checkpoint.
        pruned = float((weight == 0).sum().item() / weight.numel())
        args = group.weights
        report: dict[str, Any] = {"modifier": type(self).__name__, "shape": list(weight.shape), "group": group.name}
        if args is not None:
            if args.strategy == "group" and weight.shape[1] % args.group_size:
                raise ValueError(f"{name}: group_size {args.group_size} does not divide its input dimension "
                                 f"{weight.shape[1]}; choose a group_size that does, or strategy 'channel'")
            q_weight, scale, zero, g_idx, extra = self._quantize(weight, args, statistic, group)
            self.warn_if_damped(name, extra)
            set_weight_matrix(module, q_weight)
            module.register_buffer("weight_scale", scale.to(module.weight.device))
            module.register_buffer("weight_zero_point", zero.to(module.weight.device))
            if g_idx is not None:
                module.register_buffer("weight_g_idx", g_idx.to(module.weight.device))
            elif "weight_g_idx" in module._buffers:
                del module._buffers["weight_g_idx"]
            report.update(extra)
            report["bits"] = args.num_bits
            report["strategy"] = args.strategy
            if args.group_size:
                report["group_size"] = args.group_size
        module.quantization_args = args
        module.input_quantization_args = group.inputs
        if group.inputs is not None:
            report["input_bits"] = group.inputs.num_bits
        report["sparsity"] = pruned
        self._reports[name] = report
        return report

    def _quantize(self, weight, args, statistic, group):
        raise NotImplementedError


@register_modifier
class QuantizationModifier(QuantizationModifierBase):
    """Round-to-nearest with min/max scales; data-free for weights (activation scales are dynamic)."""

    statistic: ClassVar[str | None] = None

    def _quantize(self, weight, args, statistic, group):
        scale, zero = quantization_params(weight, args)
        q_weight = fake_quantize(weight, args, scale, zero)
        # No Hessian here, so the report's error is the plain weight-space one.
        return q_weight, scale, zero, None, {"weight_error": float((weight.float() - q_weight.float()).square().sum())}


@register_modifier
class GPTQModifier(HessianSolverModifier, QuantizationModifierBase):
    """GPTQ (Frantar et al. 2022): column-by-column quantization with OBS error compensation.

    ``actorder`` here applies to every group whose weights do not set their own. Weights that are
    already exactly zero (a pruned model) stay zero: ``preserve_sparsity_mask`` (default True).
    """

    statistic: ClassVar[str | None] = "hessian"

    actorder: str | None = None
    preserve_sparsity_mask: bool = True

    @field_validator("actorder")
    @classmethod
    def _known_actorder(cls, value):
        if value is not None and value not in ACTORDERS:
            raise ValueError(f"actorder must be one of {', '.join(ACTORDERS)} or null (got {value!r})")
        return value

    def _quantize(self, weight, args, statistic, group):
        result = gptq_quantize(
            weight, statistic.hessian, args, block_size=self.block_size, dampening_frac=self.dampening_frac,
            actorder=group.actorder or self.actorder, preserve_sparsity_mask=self.preserve_sparsity_mask,
        )
        extra = {"loss": result.loss}
        if result.dampening_frac != self.dampening_frac:
            extra["dampening_frac"] = result.dampening_frac
        return result.q_weight, result.scale, result.zero_point, result.g_idx, extra


# ----------------------------------------------------------------------------------------- activation fake-quant


def attach_activation_quantization(
    model: nn.Module, args: QuantArgs, targets: str | Sequence[str] = "Linear", ignore: Sequence[str] = ("lm_head",)
) -> list[torch.utils.hooks.RemovableHandle]:
    """Fake-quantize the input of every target Linear with dynamic ``args`` (e.g. int8 per token).

    Forward pre-hooks, so the model is unchanged; remove the returned handles to undo.
    """
    if not args.dynamic:
        raise ValueError("activation quantization needs dynamic=True (scales are computed per call)")
    handles = []
    for _, module in compressible_modules(model, "", as_patterns(targets), as_patterns(ignore)):
        handles.append(module.register_forward_pre_hook(_input_hook(args)))
    return handles


def attach_scheme_activation_quantization(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Pre-hooks for every module a modifier left with ``input_quantization_args`` (its scheme's A8/A4)."""
    return [
        module.register_forward_pre_hook(_input_hook(module.input_quantization_args))
        for module in model.modules()
        if getattr(module, "input_quantization_args", None) is not None
    ]


def _input_hook(args: QuantArgs):
    def pre_hook(module, inputs):
        return (fake_quantize_activations(inputs[0], args), *inputs[1:])

    return pre_hook
