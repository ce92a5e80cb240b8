"""compressed-tensors checkpoints for quantized models: config.json's ``quantization_config`` and the tensors.

The layout is the compressed-tensors library's, not a re-implementation: each quantized Linear's
``(weight, weight_scale, weight_zero_point)`` goes through the library's own compressor class for its
format (``pack-quantized``: int32-packed ``weight_packed`` + ``weight_shape``; ``int-quantized``: int8
``weight``), and the format is the one the library infers for the scheme (weight-only int schemes,
8-bit included, pack; schemes that also quantize activations use int-quantized - what llm-compressor
writes and vLLM reads). Our fake-quantized weights are on the library's grid bit for bit
(service.algorithms.quantization), so decompressing gives back exactly the weights we evaluated.

Float schemes go through the library's compressors the same way: FP8 (``float-quantized`` when inputs are
quantized too, else ``naive-quantized``: float8_e4m3fn ``weight`` + ``weight_scale``), NVFP4
(``nvfp4-pack-quantized``: uint8 ``weight_packed``, float8 ``weight_scale``, fp32 ``weight_global_scale``)
and MXFP4 (``mxfp4-pack-quantized``: uint8 ``weight_packed`` and E8M0 uint8 ``weight_scale``). Calibrated
activation scales (FP8's ``input_scale``, NVFP4's ``input_global_scale``) are stored beside them. The
library decompresses FP4 weights to bfloat16, so a float32 model reloads NVFP4 weights within bf16 rounding.

A module is "quantized" when a modifier left ``quantization_args`` (QuantArgs) and the buffers
``weight_scale`` / ``weight_zero_point`` on it (service.recipes.quantization_modifiers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.algorithms.quantization import QuantArgs
from service.recipes.targets import COMPRESSIBLE, Conv1D

__all__ = ["compress_quantized_tensors", "compressed_modules", "decompress_weight", "is_quantized",
           "quantization_config", "quantization_scheme", "save_quantized", "scheme_carrier"]


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "quantization_args", None) is not None and hasattr(module, "weight_scale")


# Extra per-module tensors a checkpoint keeps beside the compressed weight: NVFP4's weight global scale and the
# calibrated activation scales (static FP8, NVFP4).
EXTRA_TENSORS = ("weight_global_scale", "input_scale", "input_global_scale")


def _ct_args(args: QuantArgs, activations: bool = False):
    from compressed_tensors.quantization import QuantizationArgs

    if args.type == "int":
        return QuantizationArgs(
            num_bits=args.num_bits, type="int", symmetric=args.symmetric, strategy=args.strategy,
            group_size=args.group_size, dynamic=args.dynamic,
        )
    extra = {}
    if args.block_structure is not None:
        extra["block_structure"] = list(args.block_structure)
    if args.scale_format is not None:  # as the presets spell it: NVFP4 float8 scales, MXFP4 uint8 exponents
        dtype = torch.float8_e4m3fn if args.scale_format == "float8_e4m3fn" else torch.uint8
        extra.update(scale_dtype=dtype, zp_dtype=dtype)
    if activations and args.dynamic is not True:
        extra["observer"] = "static_minmax"  # what our calibration computes, as FP8's and NVFP4's presets name it
    return QuantizationArgs(num_bits=args.num_bits, type="float", symmetric=args.symmetric, strategy=args.strategy,
                            group_size=args.group_size, dynamic=args.dynamic, **extra)


def quant_args_from_ct(args) -> QuantArgs:
    """Our ``QuantArgs`` for compressed-tensors ``QuantizationArgs`` (the inverse of ``_ct_args``)."""
    kind = getattr(args.type, "value", args.type)
    strategy = getattr(args.strategy, "value", args.strategy)
    dynamic = getattr(args.dynamic, "value", args.dynamic)
    if kind not in ("int", "float"):
        raise ValueError(f"quantization_config: {kind!r} quantization is not supported here; allowed: int, float")
    return QuantArgs(num_bits=args.num_bits, symmetric=args.symmetric, strategy=strategy,
                     group_size=args.group_size if strategy in ("group", "tensor_group") else None,
                     dynamic=dynamic if dynamic == "local" else bool(dynamic), type=kind,
                     block_structure=tuple(args.block_structure) if args.block_structure is not None else None)


def quantization_scheme(module: nn.Module, targets: Sequence[str] = ("Linear",)):
    """The compressed-tensors ``QuantizationScheme`` (with its inferred ``format``) of one quantized module."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    if Conv1D and isinstance(module, Conv1D):
        raise ValueError("compressed-tensors stores Linear weights [out, in]; Conv1D (GPT-2) modules are not supported")
    if getattr(module, "weight_g_idx", None) is not None:
        raise ValueError("actorder 'group' (weight_g_idx) was removed from compressed-tensors 0.20; "
                         "use actorder 'static' or null to export")
    inputs = getattr(module, "input_quantization_args", None)
    scheme = QuantizationScheme(
        targets=list(targets),
        weights=_ct_args(module.quantization_args) if module.quantization_args is not None else None,
        input_activations=_ct_args(inputs, activations=True) if inputs is not None else None,
    )
    scheme.format = infer_module_format(nn.Linear, scheme).value
    return scheme


def compress_quantized_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one quantized Linear, keyed ``f"{prefix}.{name}"``.

    pack-quantized: ``weight_packed`` (int32), ``weight_scale``, ``weight_shape`` (+ packed
    ``weight_zero_point`` when asymmetric); int-quantized: ``weight`` (int8), ``weight_scale``
    (+ ``weight_zero_point``); float formats as the module docstring says. A bias and the calibrated
    ``input_scale`` / ``input_global_scale`` are passed through. Tensors are on CPU.
    """
    from compressed_tensors.compressors import BaseCompressor

    if not is_quantized(module):
        raise ValueError(f"{prefix} carries no quantization (quantization_args / weight_scale); quantize it first")
    scheme = quantization_scheme(module)
    state = {"weight": module.weight.detach().cpu(), "weight_scale": module.weight_scale.detach().cpu()}
    if module.quantization_args.type == "int":  # float grids are symmetric: no zero point is stored
        state["weight_zero_point"] = module.weight_zero_point.detach().cpu()
    for key in EXTRA_TENSORS:
        if getattr(module, key, None) is not None:
            state[key] = getattr(module, key).detach().cpu()
    if getattr(module, "bias", None) is not None:
        state["bias"] = module.bias.detach().cpu()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = compressor.compress(state, scheme)
    return {f"{prefix}.{name}" if prefix else name: tensor.contiguous() for name, tensor in out.items()}


def compressed_modules(model: nn.Module, config: Mapping[str, Any]) -> dict[str, Any]:
    """{module name: its compressed-tensors ``QuantizationScheme``} for the modules of ``model`` whose weights a
    checkpoint with this ``quantization_config`` stores compressed; each scheme's ``format`` is filled in from the
    config's when the group has none. Targets and ignore are matched as llm-compressor's recipes match them
    (class names, exact or suffix names, ``re:`` regexes); the first group that targets a module wins."""
    from compressed_tensors.quantization import QuantizationConfig

    from service.recipes.targets import matches_any

    fields = QuantizationConfig.model_fields
    parsed = QuantizationConfig.model_validate({k: v for k, v in config.items() if k in fields})
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, COMPRESSIBLE) or matches_any(name, module, parsed.ignore or []):
            continue
        for scheme in parsed.config_groups.values():
            if scheme.weights is not None and matches_any(name, module, scheme.targets):
                if scheme.format is None:
                    scheme = scheme.model_copy(update={"format": parsed.format})
                out[name] = scheme
                break
    return out


def decompress_weight(tensors: Mapping[str, torch.Tensor], scheme) -> torch.Tensor:
    """One module's dense weight from its checkpoint tensors (local names: ``weight_packed``, ``weight_scale``,
    ``weight_zero_point``, ``weight_shape``, ``weight_global_scale``, or an int8 / float8 ``weight``), by the
    library's compressor for ``scheme.format``: the inverse of :func:`compress_quantized_tensors`.

    FP4 formats come back in float32 (the library's compressor returns bfloat16, which would round NVFP4's
    ``code * scale / global_scale`` and not fit a float32 model), through the library's own unpacking, scale
    decoding and ``dequantize``: the exact values the fake-quantized model computed with."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    if scheme.format in FP4_FORMATS:
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        packed = tensors["weight_packed"]
        rows, half = packed.shape
        codes = unpack_fp4_from_uint8(packed, rows, half * 2, dtype=torch.float32)
        scale = compressor._decompress_scale(tensors["weight_scale"], torch.float32)
        return dequantize(x_q=codes, scale=scale, args=scheme.weights, dtype=torch.float32,
                          global_scale=tensors.get("weight_global_scale"))
    return compressor.decompress(dict(tensors), scheme)["weight"]


FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def scheme_carrier(module: nn.Module) -> nn.Module:
    """A weightless stand-in that carries ``module``'s quantization scheme, so a streaming writer can free the
    module's weights and still build ``quantization_config`` at the end."""
    carrier = nn.Module()
    carrier.quantization_args = module.quantization_args
    carrier.input_quantization_args = getattr(module, "input_quantization_args", None)
    carrier.weight_scale = None  # is_quantized() asks for the attribute, not its value
    return carrier


def _scheme_key(module: nn.Module) -> tuple:
    return (module.quantization_args, getattr(module, "input_quantization_args", None))


def _named(source: nn.Module | Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]]) -> list[tuple[str, Any]]:
    if isinstance(source, nn.Module):
        return [(name, m) for name, m in source.named_modules() if isinstance(m, COMPRESSIBLE)]
    if isinstance(source, Mapping):
        return list(source.items())
    return list(source)


def quantization_config(source: Any, *, ignore: Sequence[str] = (), sparsity: Mapping[str, Any] | None = None) -> dict:
    """config.json's ``quantization_config`` for a quantized model, as compressed-tensors writes it.

    ``source`` is one of
      * a model: every compressible module is inspected; with a single scheme the group targets
        ``["Linear"]`` and every unquantized Linear (e.g. ``lm_head``) is listed in ``ignore``;
        with several schemes each group targets its modules by name;
      * a mapping / iterable of ``(name, module)`` (what a streaming writer saw): groups by name;
        pass the unquantized Linears (``lm_head``) in ``ignore``;
      * a list of quantization modifiers: their config groups and ``ignore`` as written in the recipe.
    ``sparsity``: optional compressed-tensors sparsity description (``sparsity_structure``,
    ``global_sparsity``, ...) stored under ``sparsity_config``; compressed-tensors 0.20 itself
    writes ``{}`` there and does not read it on load.
    """
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME, QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )
    from compressed_tensors.compressors.format import _flatten_formats
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups: dict[str, QuantizationScheme] = {}
    ignored = list(ignore)
    if isinstance(source, (list, tuple)) and source and all(hasattr(m, "groups") for m in source):
        for modifier in source:
            for group in modifier.groups:
                probe = nn.Linear(1, 1)
                probe.quantization_args, probe.input_quantization_args = group.weights, group.inputs
                groups[f"group_{len(groups)}"] = quantization_scheme(probe, group.targets)
            ignored += [p for p in modifier.ignore if p not in ignored]
    else:
        named = _named(source)
        quantized = [(name, m) for name, m in named if is_quantized(m)]
        if not quantized:
            raise ValueError("no quantized module found (quantize with QuantizationModifier / GPTQModifier first)")
        by_scheme: dict[tuple, list[tuple[str, nn.Module]]] = {}
        for name, m in quantized:
            by_scheme.setdefault(_scheme_key(m), []).append((name, m))
        whole_model = isinstance(source, nn.Module)
        for members in by_scheme.values():
            targets = ["Linear"] if whole_model and len(by_scheme) == 1 else [name for name, _ in members]
            groups[f"group_{len(groups)}"] = quantization_scheme(members[0][1], targets)
        if whole_model:
            ignored += [name for name, m in named if not is_quantized(m) and name not in ignored]
    formats = {CompressionFormat(s.format) for s in groups.values()}
    config = QuantizationConfig(
        config_groups=groups, format=_flatten_formats(formats).value,
        quantization_status=QuantizationStatus.COMPRESSED, ignore=ignored,
    )
    return {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: dict(sparsity) if sparsity else {},
        TRANSFORM_CONFIG_NAME: {},
        **config.model_dump(mode="json", exclude={"quant_method"}),
    }


def sparsity_description(model: nn.Module, structure: str | None = None) -> dict:
    """compressed-tensors' sparsity fields for the quantized Linears of ``model`` (format "dense")."""
    zeros = total = 0
    for _, m in model.named_modules():
        if is_quantized(m):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return {"format": "dense", "global_sparsity": zeros / total if total else 0.0, "targets": ["Linear"],
            "ignore": [], "sparsity_structure": structure or "unstructured"}


def save_quantized(model: nn.Module, tokenizer_dir: str | Path | None, out_dir: str | Path, *,
                   sparsity_structure: str | None = None) -> Path:
    """Write an in-memory quantized model as a compressed-tensors checkpoint that transformers loads.

    Every quantized Linear is stored through :func:`compress_quantized_tensors`; the rest of the state
    dict (embeddings, norms, unquantized Linears) as it is. ``sparsity_structure`` (e.g. "2:4") is
    recorded in ``quantization_config.sparsity_config`` when given. Tokenizer files are copied from
    ``tokenizer_dir`` when given.
    """
    from service.engine.export import copy_side_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    quantized_prefixes = set()
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE) and is_quantized(module):
            state.update(compress_quantized_tensors(name, module))
            quantized_prefixes.add(name)
    for key, tensor in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        if prefix in quantized_prefixes:
            continue  # already written in compressed form (our scale/zero-point buffers included)
        state[key] = tensor
    sparsity = sparsity_description(model, sparsity_structure) if sparsity_structure else None
    model.save_pretrained(str(out), state_dict=state)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config(model, sparsity=sparsity)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        copy_side_files(Path(tokenizer_dir), out)
    return out


def load_quantized(model_dir: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a compressed-tensors checkpoint through the library's own decompression, to a dense model.

    The path llm-compressor documents for "decompress into a fresh model": build the model on CPU,
    ``apply_quantization_config``, ``ModelCompressor.compress_model`` (the compressed module layout),
    load the checkpoint tensors into it, ``decompress_model``. Unlike transformers' loader in
    transformers 5.23 + compressed-tensors 0.20, it also reads asymmetric pack-quantized checkpoints:
    there the loader builds the compressed layout on the meta device, where the library skips packing
    the zero point, and then refuses the checkpoint's packed ``weight_zero_point`` as a size mismatch.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    ct_config = config.quantization_config
    ct_config = ct_config.to_dict() if hasattr(ct_config, "to_dict") else dict(ct_config)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig(**ct_config))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    # Online rotations' tensors (service.engine.transform_export) belong to transform modules this dense model does not
    # have: service.engine.model_source.load_output re-attaches the rotations themselves.
    groups = tuple(f".{g}_" for g in (ct_config.get("transform_config") or {}).get("config_groups", {}))
    state = {k: v for k, v in state.items() if not (groups and any(g in k for g in groups))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not fit the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    compressor.decompress_model(model)
    if tied:
        model.tie_weights()
    return model
