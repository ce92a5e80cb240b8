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

Integer and float grids are supported: compressed-tensors' FP8 (static per-tensor weights and inputs),
FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, NVFP4, MXFP4A16 and MXFP4 presets, or ``type: float`` config groups
(service.algorithms.float_quantization). Static activation scales (FP8's ``input_scale``, NVFP4's
``input_global_scale``) are calibrated from the modules' inputs (``observe_input``, a running min/max as
compressed-tensors' "static_minmax" observer) and kept as buffers. Output-activation and KV-cache schemes
are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from service.algorithms import float_quantization as fq
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

def _fp(bits: int, strategy: str, **extra) -> dict:
    return {"num_bits": bits, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False, **extra}


# compressed-tensors 0.20's float presets (quant_scheme.PRESET_SCHEMES), field for field.
_NVFP4_W = _fp(4, "tensor_group", group_size=16, scale_dtype="float8_e4m3fn", zp_dtype="float8_e4m3fn")
_MXFP4_W = _fp(4, "group", group_size=32, scale_dtype="uint8", zp_dtype="uint8")
FLOAT_PRESETS: dict[str, dict] = {
    "FP8": {"weights": _fp(8, "tensor"), "input_activations": _fp(8, "tensor", observer="static_minmax")},
    "FP8_DYNAMIC": {"weights": _fp(8, "channel"), "input_activations": _fp(8, "token", dynamic=True)},
    "FP8_BLOCK": {"weights": _fp(8, "block", block_structure=[128, 128]),
                  "input_activations": _fp(8, "group", group_size=128, dynamic=True)},
    "NVFP4A16": {"weights": _NVFP4_W},
    "NVFP4": {"weights": _NVFP4_W, "input_activations": {**_NVFP4_W, "dynamic": "local", "observer": "static_minmax"}},
    "MXFP4A16": {"weights": _MXFP4_W},
    "MXFP4": {"weights": _MXFP4_W, "input_activations": {**_MXFP4_W, "dynamic": True}},
}

# compressed-tensors 0.20's integer presets (quant_scheme.PRESET_SCHEMES): WxA16 / WxAy use int weights in
# groups of 128 with per-token dynamic int activations; W8A8 (alias INT8) uses per-channel weights.
PRESET_SCHEMES: dict[str, dict] = {
    **{f"W{b}A16": {"weights": _weights(b)} for b in range(2, 9)},
    **{f"W{b}A8": {"weights": _weights(b), "input_activations": _A8} for b in range(2, 8)},
    **{f"W{b}A4": {"weights": _weights(b), "input_activations": _A4} for b in range(2, 5)},
    "W4A16_ASYM": {"weights": {**_weights(4), "symmetric": False}},
    "W8A8": {"weights": _weights(8, "channel", None), "input_activations": _A8},
    "INT8": {"weights": _weights(8, "channel", None), "input_activations": _A8},
    **FLOAT_PRESETS,
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
    if kind not in ("int", "float"):
        raise ValueError(f"{field}.type must be one of int, float; got {data['type']!r}")
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
    dynamic = data.get("dynamic", False)
    dynamic = str(dynamic).lower() if isinstance(dynamic, str) else bool(dynamic)
    dynamic = {"true": True, "false": False}.get(dynamic, dynamic) if isinstance(dynamic, str) else dynamic
    block = data.get("block_structure")
    if isinstance(block, str):  # compressed-tensors also reads "128x128"
        try:
            block = [int(v) for v in block.split("x")]
        except ValueError:
            raise ValueError(f"{field}.block_structure must be [rows, cols] of positive integers; got {block!r}")
    try:
        args = QuantArgs(
            num_bits=data.get("num_bits", 8), symmetric=bool(data.get("symmetric", True)), strategy=strategy,
            group_size=group_size, dynamic=dynamic, type=kind,
            block_structure=tuple(block) if isinstance(block, list) else block,
        )
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None
    for key in ("scale_dtype", "zp_dtype"):
        # The storage of a float scheme's scales follows from its strategy; accept only that one (or null).
        value = data.get(key)
        allowed = _scale_dtype_name(args)
        if value is not None and str(value).replace("torch.", "") != allowed:
            raise ValueError(f"{field}.{key} must be null{f' or {allowed!r}' if allowed else ''} for this scheme; "
                             f"got {value!r}")
    return args, actorder


def _scale_dtype_name(args: QuantArgs) -> str | None:
    return {"float8_e4m3fn": "float8_e4m3fn", "e8m0": "uint8"}.get(args.scale_format)


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
        if i_args.dynamic is False and (i_args.type != "float" or i_args.strategy != "tensor"):
            raise ValueError(f"{field}.input_activations.dynamic must be true (static activation scales are "
                             "calibrated for float per-tensor schemes only, as FP8's)")
        if i_args.strategy in ("channel", "block"):
            raise ValueError(f"{field}.input_activations.strategy must be one of token, tensor, group, tensor_group")
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
    _ranges: dict[str, fq.ActivationRange] = PrivateAttr(default_factory=dict)  # observed inputs, by module name
    _fused_global: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)  # NVFP4 global scales, by module

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

    @property
    def observes_inputs(self) -> bool:
        """True when a group's input scales are calibrated from data (FP8's static scale, NVFP4's global one):
        the pipeline must then pass each target module's calibration inputs to :meth:`observe_input`."""
        return any(_static_inputs(group.inputs) for group in self._groups)

    def begin_block(self, block_name: str, modules: Sequence[tuple[str, nn.Module]]) -> None:
        """Called with a block's target modules before any of them is calibrated or compressed: NVFP4's global
        weight scales are shared by the modules vLLM fuses (q/k/v, gate/up), as llm-compressor does
        (``update_fused_layer_weight_global_scales``): the smallest global scale of the set, from the dense weights."""
        by_name = dict(modules)
        for name, module in modules:
            if name in self._fused_global:
                continue
            group = self.group_for(name, module)
            if group.weights is None or group.weights.strategy != "tensor_group":
                continue
            parent, _, leaf = name.rpartition(".")
            fused = next((f for f in FUSED_LAYERS if leaf in f), None)
            if fused is None:
                continue
            members = [f"{parent}.{n}" if parent else n for n in fused]
            if not all(m in by_name and self.group_for(m, by_name[m]) is group for m in members):
                continue
            g = torch.stack([fq.global_scale(weight_matrix(by_name[m]), group.weights)[0].to(torch.float32)
                             for m in members]).min().reshape(1)
            for m in members:
                self._fused_global[m] = g.clone()  # one tensor each: safetensors refuses shared storage

    def set_input_range(self, name: str, observed: fq.ActivationRange | None) -> None:
        """The streaming pipeline's way in: module ``name``'s calibration input range, accumulated (and merged
        across data-parallel workers) by the pipeline like any other statistic."""
        if observed is not None:
            self._ranges[name] = observed

    def observe_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """Fold one calibration input ``x [..., in_features]`` of module ``name`` into its running min/max."""
        group = self.group_for(name, module)
        if _static_inputs(group.inputs):
            self._ranges.setdefault(name, fq.ActivationRange()).add(x)

    def on_initialize(self, state, **kwargs: Any) -> bool:
        done = super().on_initialize(state, **kwargs)
        blocks: dict[str, list[tuple[str, nn.Module]]] = {}
        for module, (name, _, block_name) in self._module_names.items():
            blocks.setdefault(block_name, []).append((name, module))
        for block_name, modules in blocks.items():
            self.begin_block(block_name, modules)
        return done

    def calibrate_module(self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if self.statistic == "input_range":  # RTN with calibrated input scales: the range is its only statistic
            acc = self._statistics.get(module)
            if acc is None:
                acc = self._statistics[module] = fq.ActivationRange()
            acc.add(args[0])
            return
        if self.statistic is not None:
            super().calibrate_module(module, args, _output)
        if module in self._module_names:
            self.observe_input(self._module_names[module][0], module, args[0])

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
        check_module_shape(name, weight.shape, group)
        if args is not None:
            g_scale = None
            if args.strategy == "tensor_group":
                g_scale = self._fused_global.pop(name, None)
                if g_scale is None:
                    g_scale = fq.global_scale(weight, args)
            q_weight, scale, zero, g_idx, extra = self._quantize(weight, args, statistic, group, g_scale)
            self.warn_if_damped(name, extra)
            set_weight_matrix(module, q_weight)
            module.register_buffer("weight_scale", scale.to(module.weight.device))
            module.register_buffer("weight_zero_point", zero.to(module.weight.device))
            _set_buffer(module, "weight_global_scale", g_scale.to(module.weight.device) if g_scale is not None else None)
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
        for key in ("input_scale", "input_global_scale"):
            _set_buffer(module, key, None)
        if _static_inputs(group.inputs):
            observed = statistic if isinstance(statistic, fq.ActivationRange) else self._ranges.pop(name, None)
            self._ranges.pop(name, None)
            if observed is None or observed.lo is None:
                raise ValueError(
                    f"{name}: the {group.name} scheme calibrates its input scale from data, but no calibration input "
                    "of this module was observed (the pipeline passes each target module's inputs to observe_input; "
                    "give a dataset)")
            for key, tensor in fq.static_input_params(observed, group.inputs, weight.dtype).items():
                _set_buffer(module, key, tensor.to(module.weight.device))
            report["input_tokens"] = observed.num_tokens
        if group.inputs is not None:
            report["input_bits"] = group.inputs.num_bits
        report["sparsity"] = pruned
        self._reports[name] = report
        return report

    def _quantize(self, weight, args, statistic, group, global_scale):
        raise NotImplementedError


# Modules vLLM runs as one fused matmul: NVFP4 gives each set one weight global scale (llm-compressor's sets).
FUSED_LAYERS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _static_inputs(args: QuantArgs | None) -> bool:
    return args is not None and args.dynamic is not True


def _set_buffer(module: nn.Module, key: str, tensor: torch.Tensor | None) -> None:
    if tensor is not None:
        module.register_buffer(key, tensor)
    elif key in module._buffers:
        del module._buffers[key]


def check_module_shape(name: str, shape: Sequence[int], group: QuantGroup) -> None:
    """A ValueError naming the module, the field and the fix when its weight ``[rows, cols]`` does not fit the
    group's group_size (weights or inputs) or block_structure."""
    rows, cols = shape[0], shape[1]
    for part, args in (("", group.weights), ("input_activations.", group.inputs)):
        if args is None:
            continue
        if args.strategy in ("group", "tensor_group") and cols % args.group_size:
            fix = "strategy 'channel'" if args.type == "int" else "add the module to ignore"
            raise ValueError(
                f"{name}: {part}group_size {args.group_size} does not divide its input dimension {cols}; {fix}, or "
                f"choose a group_size that divides {cols}")
        if args.strategy == "block" and (rows % args.block_structure[0] or cols % args.block_structure[1]):
            raise ValueError(
                f"{name}: {part}block_structure {list(args.block_structure)} does not divide its weight shape "
                f"{[rows, cols]}; add the module to ignore, or choose block sizes that divide it")


@register_modifier
class QuantizationModifier(QuantizationModifierBase):
    """Round-to-nearest with min/max scales; data-free, except that calibrated input scales (FP8, NVFP4) observe
    the calibration inputs."""

    @property
    def statistic(self) -> str | None:  # type: ignore[override]
        # Calibrated input scales make RTN a data task, so the pipeline runs its calibration forward first.
        return "input_range" if self.observes_inputs else None

    def _quantize(self, weight, args, statistic, group, g_scale):
        scale, zero = quantization_params(weight, args, global_scale=g_scale)
        q_weight = fake_quantize(weight, args, scale, zero, global_scale=g_scale)
        # No Hessian here, so the report's error is the plain weight-space one.
        extra = {"weight_error": float((weight.float() - q_weight.float()).square().sum())}
        return q_weight, scale, zero, None, extra


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

    def _quantize(self, weight, args, statistic, group, g_scale):
        if args.type == "float":
            res = fq.gptq_quantize_float(
                weight, statistic.hessian, args, block_size=self.block_size, dampening_frac=self.dampening_frac,
                actorder=group.actorder or self.actorder, preserve_sparsity_mask=self.preserve_sparsity_mask,
                weight_global_scale=g_scale,
            )
            extra = {"loss": res.loss}
            if res.dampening_frac != self.dampening_frac:
                extra["dampening_frac"] = res.dampening_frac
            zero = torch.zeros(res.scale.shape, dtype=torch.int8, device=res.scale.device)
            return res.q_weight, res.scale, zero, None, extra
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
    """Pre-hooks for every module a modifier left with ``input_quantization_args`` (its scheme's A8/A4, FP8, FP4);
    static schemes read the module's calibrated ``input_scale`` / ``input_global_scale`` buffers."""
    return [
        module.register_forward_pre_hook(_input_hook(module.input_quantization_args))
        for module in model.modules()
        if getattr(module, "input_quantization_args", None) is not None
    ]


def _input_hook(args: QuantArgs):
    def pre_hook(module, inputs):
        scale = getattr(module, "input_scale", None)
        g_scale = getattr(module, "input_global_scale", None)
        return (fake_quantize_activations(inputs[0], args, scale=scale, global_scale=g_scale), *inputs[1:])

    return pre_hook
