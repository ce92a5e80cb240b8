"""Floating-point quantization math: FP8 (E4M3) and FP4 (E2M1) grids, their scales, fake-quantize, and GPTQ on them.

Pure tensor functions, no modules or hooks. The arithmetic is compressed-tensors 0.20's (``calculate_qparams``,
``generate_gparam``, ``generate_mx_scales`` and ``forward._quantize_dequantize``), so a checkpoint written by its
compressors decompresses to exactly the values our fake-quantized model computed with. Symmetric only:

* FP8 E4M3: values in [-448, 448] on torch.float8_e4m3fn's grid; ``scale = max|w| / 448`` (per tensor, channel,
  token, group or 2-D block); a zero scale becomes ``finfo(dtype).eps``;
* NVFP4 ("tensor_group", group 16): E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} (and negatives), a per-tensor global
  scale ``g = 448 * 6 / max|w|`` (fp32 [1]) and per-group scales ``s = fp8(g * max|group| / 6)`` (FP8-rounded, a
  zero becomes 0.125); values are ``q * (s / g)``;
* MXFP4 ("group", group 32): E2M1 values with power-of-two (E8M0) group scales
  ``2 ** (floor(log2(round_pow2(max|group|))) - 2)``, stored as the biased exponent (uint8, +127).

Rounding is round-to-nearest-even on each grid (fp8 by torch's cast, fp4 by thresholds at the midpoints).
Shapes of ``scale`` for a weight ``[rows, cols]``: tensor ``[1]``, channel ``[rows, 1]``, group / tensor_group
``[rows, cols // group_size]``, block ``[rows // block_rows, cols // block_cols]``; activations (token, group,
tensor_group) reduce over the last dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from service.algorithms.quantization import QuantArgs

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP4_MAX = 6.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_SCALE_EPS = 0.125  # what compressed-tensors puts in place of an FP8 group scale that rounded to 0
MX_OFFSET = 2  # floor(log2(6)): maps a group's max into E2M1's range


def type_max(args: "QuantArgs") -> float:
    return FP8_MAX if args.num_bits == 8 else FP4_MAX


def round_to_fp8(x: Tensor) -> Tensor:
    """Nearest float8_e4m3fn value (ties to even) of ``x`` clamped to [-448, 448], in ``x``'s dtype."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def round_to_fp4(x: Tensor) -> Tensor:
    """Nearest E2M1 value of ``x`` (ties to the even code), saturating at +-6, in ``x``'s dtype.

    The code of |x| counts the midpoints it passes; a midpoint itself goes to the even neighbour
    (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
    """
    a = x.abs()
    code = ((a > 0.25).to(torch.int64) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5)
            + (a > 5.0))
    grid = torch.tensor(E2M1_GRID, dtype=x.dtype, device=x.device)
    return grid[code] * torch.sign(x)


def round_to_grid(x: Tensor, args: "QuantArgs") -> Tensor:
    return round_to_fp8(x) if args.num_bits == 8 else round_to_fp4(x)


# --------------------------------------------------------------------------------------------------- observation


def _blocks(w: Tensor, args: "QuantArgs") -> Tensor:
    """``w [rows, cols]`` as ``[rows // br, cols // bc, br, bc]`` (block strategy)."""
    br, bc = args.block_structure
    rows, cols = w.shape[-2:]
    if rows % br or cols % bc:
        raise ValueError(f"block_structure {list(args.block_structure)} must divide the weight shape {[rows, cols]}")
    return w.reshape(rows // br, br, cols // bc, bc).transpose(1, 2)


def _groups(w: Tensor, group_size: int) -> Tensor:
    cols = w.shape[-1]
    if cols % group_size:
        raise ValueError(f"group_size {group_size} must divide the input dimension {cols}")
    return w.unflatten(-1, (cols // group_size, group_size))


def absmax(w: Tensor, args: "QuantArgs") -> Tensor:
    """max(|min(w, 0)|, max(w, 0)) per strategy (shaped like the scale), in ``w``'s dtype."""
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(w)
        lo, hi = lo.reshape(1), hi.reshape(1)
    elif args.strategy in ("group", "tensor_group"):
        g = _groups(w, args.group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    elif args.strategy == "block":
        b = _blocks(w, args)
        lo, hi = b.amin(dim=(-2, -1)), b.amax(dim=(-2, -1))
    else:  # channel (a weight's rows), token (an activation's rows)
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    return torch.maximum(lo.abs(), hi.abs())


def global_scale_from_absmax(amax: Tensor) -> Tensor:
    """NVFP4's per-tensor global scale ``448 * 6 / amax`` (fp32 [1]); 1 where that is not finite."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    g = (FP8_MAX * FP4_MAX) / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def global_scale(w: Tensor, args: "QuantArgs") -> Tensor:
    """The global scale of ``w`` (all of it) for a "tensor_group" (NVFP4) quantization."""
    lo, hi = torch.aminmax(w.detach())
    return global_scale_from_absmax(torch.maximum(lo.clamp(max=0).abs(), hi.clamp(min=0)))


def _round_to_power_2(x: Tensor) -> Tensor:
    """compressed-tensors' ``round_to_power_2`` for E2M1: drop the mantissa after adding half of E2M1's last
    mantissa step, so values from 1.75 * 2^e up go to 2^(e+1)."""
    bits = {torch.float32: (torch.int32, 23, 8), torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
            torch.float64: (torch.int64, 52, 11)}
    if x.dtype not in bits:
        raise TypeError(f"unsupported dtype {x.dtype}")
    int_dtype, mantissa, exponent = bits[x.dtype]
    wide = torch.int64 if int_dtype == torch.int64 else torch.int32
    i = x.view(int_dtype).to(wide)
    if int_dtype == torch.int16:
        i = i & 0xFFFF  # the unsigned view compressed-tensors takes
    add = 1 << (mantissa - 1 - 1)
    mask = ((1 << (exponent + 1)) - 1) << mantissa
    out = (i + add) & mask
    if int_dtype == torch.int16:  # back to the signed 16-bit pattern of the same bits
        return (out - ((out >> 15) & 1) * 65536).to(torch.int16).view(x.dtype)
    return out.to(int_dtype).view(x.dtype)


def mx_exponent(amax: Tensor) -> Tensor:
    """E8M0 biased exponents (0..255, in ``amax``'s dtype) of MX group scales for group maxima ``amax``."""
    e = 127 + torch.floor(torch.log2(_round_to_power_2(amax))) - MX_OFFSET
    return e.clamp(0, 255).round()


def mx_scale_from_exponent(e: Tensor, dtype: torch.dtype) -> Tensor:
    return (2.0 ** (e.to(torch.int32) - 127).to(torch.float)).to(dtype)


def scale_from_absmax(amax: Tensor, args: "QuantArgs", global_scale: Tensor | None = None) -> Tensor:
    """Scales for absolute maxima ``amax`` (compressed-tensors' ``calculate_qparams``, symmetric float)."""
    if args.scale_format == "e8m0":
        scale = mx_scale_from_exponent(mx_exponent(amax), amax.dtype)
        return torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = amax / type_max(args)
    if args.scale_format == "float8_e4m3fn":
        if global_scale is not None:
            scale = global_scale * scale
        scale = round_to_fp8(scale)
        eps = FP8_SCALE_EPS
    else:
        eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype, device=scale.device), scale)


def float_scale(w: Tensor, args: "QuantArgs", global_scale: Tensor | None = None) -> Tensor:
    """The scale of ``w`` for ``args`` (shape per strategy, dtype of ``w``, or fp32 with a global scale)."""
    if args.strategy == "tensor_group" and global_scale is None:
        raise ValueError("strategy 'tensor_group' (NVFP4) needs the tensor's global scale")
    with torch.no_grad():
        return scale_from_absmax(absmax(w.detach(), args), args, global_scale)


# ------------------------------------------------------------------------------------------------ fake-quantize


def _view(w: Tensor, args: "QuantArgs") -> Tensor:
    if args.strategy in ("group", "tensor_group"):
        return _groups(w, args.group_size)
    if args.strategy == "block":
        return _blocks(w, args)
    return w


def _unview(v: Tensor, w: Tensor, args: "QuantArgs") -> Tensor:
    if args.strategy == "block":
        return v.transpose(1, 2).reshape(w.shape)
    return v.reshape(w.shape)


def _expand(scale: Tensor, args: "QuantArgs") -> Tensor:
    if args.strategy in ("group", "tensor_group"):
        return scale.unsqueeze(-1)
    if args.strategy == "block":
        return scale.unsqueeze(-1).unsqueeze(-1)
    return scale


def effective_scale(scale: Tensor, global_scale: Tensor | None) -> Tensor:
    return scale if global_scale is None else scale / global_scale


def codes(w: Tensor, args: "QuantArgs", scale: Tensor, global_scale: Tensor | None = None) -> Tensor:
    """Grid values of ``w`` (FP8 or E2M1 values as floats in ``w``'s dtype), shaped like ``w``."""
    s = _expand(effective_scale(scale, global_scale), args)
    m = type_max(args)
    return _unview(round_to_grid((_view(w, args) / s).clamp(-m, m), args), w, args).to(w.dtype)


def dequantize(q: Tensor, args: "QuantArgs", scale: Tensor, global_scale: Tensor | None = None) -> Tensor:
    """``q * (scale / global_scale)`` in the scale's dtype, shaped like ``q``."""
    s = _expand(effective_scale(scale, global_scale), args)
    return _unview(_view(q, args).to(s.dtype) * s, q, args)


def qdq(w: Tensor, args: "QuantArgs", scale: Tensor, global_scale: Tensor | None = None) -> Tensor:
    """Quantize-dequantize ``w`` on the float grid (compressed-tensors' fused ``_quantize_dequantize``); dtype of ``w``."""
    s = _expand(effective_scale(scale, global_scale), args)
    m = type_max(args)
    scaled = _view(w, args) / s
    out = round_to_grid(scaled.clamp(-m, m), args).to(s.dtype) * s
    return _unview(out, w, args).to(w.dtype)


# --------------------------------------------------------------------------------------------- activation range


class ActivationRange:
    """Running min/max of a module's inputs over calibration (compressed-tensors' "static_minmax" observer).

    ``add(x)`` folds in one call's input ``x [..., features]``; ``absmax`` is the fp32 scalar [1] that static
    FP8 scales (``absmax / 448``) and NVFP4 activation global scales (``448 * 6 / absmax``) are computed from.
    """

    def __init__(self):
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.num_tokens = 0

    def add(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo.to(self.lo.device))
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi.to(self.hi.device))
        self.num_tokens += x[..., 0].numel()

    def merge(self, other: "ActivationRange") -> None:
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi = other.lo.clone(), other.hi.clone()
        else:
            self.lo = torch.minimum(self.lo, other.lo.to(self.lo.device))
            self.hi = torch.maximum(self.hi, other.hi.to(self.hi.device))
        self.num_tokens += other.num_tokens

    def to(self, device) -> "ActivationRange":
        """In place, like the other calibration statistics (the pipeline moves them between devices)."""
        if self.lo is not None:
            self.lo, self.hi = self.lo.to(device), self.hi.to(device)
        return self

    def nbytes(self) -> int:
        return 0 if self.lo is None else self.lo.numel() * 4 * 2

    @property
    def absmax(self) -> Tensor:
        if self.lo is None:
            raise ValueError("no calibration input observed")
        return torch.maximum(self.lo.clamp(max=0).abs(), self.hi.clamp(min=0)).reshape(1)


def static_input_params(observed: ActivationRange, args: "QuantArgs", dtype: torch.dtype) -> dict[str, Tensor]:
    """The calibrated activation tensors a module keeps for ``args``: ``input_scale`` ([1], ``dtype``) for a static
    per-tensor scheme (FP8), ``input_global_scale`` (fp32 [1]) for NVFP4's locally dynamic one. ``dtype``: the
    activations' (the model's) dtype."""
    # The maxima are exact in the activations' dtype; the division happens in it, as the library's observer does.
    if args.strategy == "tensor_group":
        return {"input_global_scale": global_scale_from_absmax(observed.absmax.to(dtype))}
    return {"input_scale": scale_from_absmax(observed.absmax.to(dtype), args)}


def fake_quantize_float_activations(x: Tensor, args: "QuantArgs", scale: Tensor | None = None,
                                    global_scale: Tensor | None = None) -> Tensor:
    """Fake-quantize activations ``x [..., features]``: dynamic scales per call (token / tensor / group, and NVFP4's
    local group scales under the calibrated ``global_scale``), or the calibrated static ``scale``."""
    if args.dynamic is False:
        if scale is None:
            raise ValueError("static activation quantization needs its calibrated input_scale")
    else:
        if args.strategy == "tensor_group" and global_scale is None:
            raise ValueError("NVFP4 activations need their calibrated input_global_scale")
        scale = float_scale(x, args, global_scale)
    return qdq(x, args, scale, global_scale)


# ----------------------------------------------------------------------------------------------------------- GPTQ


class FloatGPTQResult(NamedTuple):
    """``q_weight`` [rows, cols] (weight dtype, on the grid), ``scale`` (per strategy), ``global_scale`` (fp32 [1]
    or None), ``loss`` (sum (w - q)^2 / U_ii^2 / 2), ``dampening_frac`` (the one finally used)."""

    q_weight: Tensor
    scale: Tensor
    global_scale: Tensor | None
    loss: float
    dampening_frac: float


def gptq_quantize_float(weight: Tensor, hessian: Tensor, args: "QuantArgs", *, block_size: int = 128,
                        dampening_frac: float = 0.01, actorder: str | None = None,
                        preserve_sparsity_mask: bool = False,
                        weight_global_scale: Tensor | None = None) -> FloatGPTQResult:
    """GPTQ (service.algorithms.gptq's solve) with a float grid as the per-column quantizer.

    Scales: NVFP4's global scale from the original weight (as llm-compressor fixes it before the solve), or the
    given ``weight_global_scale`` (one shared by fused modules, fp32 [1]); group
    (MXFP4) and tensor_group (NVFP4) scales measured when the solve reaches the group, from updated weights
    (actorder None); with actorder "static"/"weight", and for tensor / channel / block, all scales come from the
    original weight. 0 is on every grid, so pruned weights (``preserve_sparsity_mask``) stay exactly 0.
    """
    from service.algorithms.hessian import inverse_hessian_factor

    if args.dynamic or args.strategy == "token":
        raise ValueError("GPTQ quantizes weights: strategy must not be 'token' and dynamic must be False")
    if actorder not in (None, "static", "weight"):
        raise ValueError(f"actorder for float grids must be one of static, weight or None; got {actorder!r}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}] for weight {tuple(weight.shape)}; got {tuple(hessian.shape)}")
    W = weight.detach().to(torch.float32, copy=True)
    mask = (weight != 0) if preserve_sparsity_mask else None
    gscale = None
    if args.strategy == "tensor_group":
        gscale = weight_global_scale if weight_global_scale is not None else global_scale(weight, args)
    grouped = args.strategy in ("group", "tensor_group")
    lazy = grouped and actorder is None
    scale = None if lazy else float_scale(weight, args, gscale).to(torch.float32)
    if lazy:
        scale = torch.empty(rows, cols // args.group_size, dtype=torch.float32, device=W.device)

    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=True)
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W[:, dead] = 0.0
    perm = None
    if actorder is not None:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    U, used_frac = inverse_hessian_factor(H, float(dampening_frac))
    del H
    order = perm.tolist() if perm is not None else list(range(cols))
    # Per-column effective scale [rows] (scale / global) for column j in processing order.
    if args.strategy == "tensor":
        def col_scale(j):
            return scale.expand(rows)
    elif args.strategy == "channel":
        def col_scale(j):
            return scale[:, 0]
    elif args.strategy == "block":
        br, bc = args.block_structure

        def col_scale(j):
            return scale[:, order[j] // bc].repeat_interleave(br)
    else:
        def col_scale(j):
            return effective_scale(scale[:, order[j] // args.group_size], gscale)
    m = type_max(args)
    if grouped:
        block_size = max(args.group_size, block_size // args.group_size * args.group_size)
    keep = mask.to(torch.float32) if mask is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if lazy and j % args.group_size == 0:
                part = W1[:, i: i + args.group_size]
                amax = torch.maximum(part.amin(dim=-1).clamp(max=0).abs(), part.amax(dim=-1).clamp(min=0))
                scale[:, j // args.group_size] = scale_from_absmax(amax, args, gscale).to(torch.float32)
            w = W1[:, i].clone()
            s = col_scale(j).to(torch.float32)
            q = round_to_grid((w / s).clamp(-m, m), args) * s
            if keep is not None:
                q = q * keep[:, j]
            W1[:, i] = q
            err = (w - q) / U1[i, i]
            loss += err.square().sum() / 2
            W1[:, i + 1:] -= err.unsqueeze(1) * U1[i, i + 1:].unsqueeze(0)
            if keep is not None:
                W1[:, i + 1:] *= keep[:, j + 1:i2]
            E1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
            if keep is not None:
                W[:, i2:] *= keep[:, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        W = W[:, inv]
    out_scale = scale.to(weight.dtype) if gscale is None else scale
    # Once more through the grid in the weight's dtype: the stored values are exactly what the checkpoint decompresses to.
    q_weight = qdq(W.to(weight.dtype), args, out_scale, gscale)
    if mask is not None:
        q_weight = torch.where(weight != 0, q_weight, torch.zeros((), dtype=q_weight.dtype))
    return FloatGPTQResult(q_weight, out_scale, gscale, float(loss), used_frac)
