"""Quantization math: scales, zero points, quantize / dequantize / fake-quantize.

Integer grids are here; float grids (FP8, NVFP4, MXFP4: ``type="float"``) are in
service.algorithms.float_quantization, and ``quantization_params`` / ``fake_quantize`` /
``fake_quantize_activations`` dispatch to it. For the integer grids:

Pure tensor functions, no modules or hooks. The arithmetic matches compressed-tensors 0.20
(``calculate_qparams`` and ``forward.quantize/dequantize``) bit for bit, so a checkpoint we write
decompresses in that library to exactly the values our fake-quantized model computed with:

* the range of ``b`` bits is ``[-2^(b-1), 2^(b-1) - 1]`` for both symmetric and asymmetric
  quantization (int4: [-8, 7]); the integers are signed, the zero point is int8;
* symmetric: ``scale = max|w| / ((q_max - q_min) / 2)``, i.e. max|w| / 7.5 for int4: the largest
  magnitude rounds to -8 on the negative side and clamps to 7 on the positive side;
* asymmetric: min/max are first widened to include 0, ``scale = (max - min) / (q_max - q_min)``,
  ``zero_point = round(clamp(q_min - min / scale, q_min, q_max))``;
* a zero scale becomes ``finfo(dtype).eps`` (all-zero rows stay zero);
* ``q = round(clamp(w / scale + zero_point, q_min, q_max))`` (round half to even),
  ``w' = (q - zero_point) * scale``; all in the dtype of ``w``.

Shapes of ``scale`` / ``zero_point`` for a weight ``[rows, cols]`` (compressed-tensors layout):
tensor ``[1]``, channel ``[rows, 1]``, group ``[rows, cols // group_size]``. For activations
(``token``) the reduction is over the last (feature) dimension: ``[..., 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STRATEGIES = ("tensor", "channel", "group", "token", "block", "tensor_group")
TYPES = ("int", "float")
DYNAMIC = (False, True, "local")
FLOAT_BITS = (4, 8)


@dataclass(frozen=True)
class QuantArgs:
    """How to quantize one tensor; field names mirror compressed-tensors ``QuantizationArgs``.

    Attributes:
        num_bits: 2..8 for int; 8 (FP8 E4M3) or 4 (FP4 E2M1) for float.
        symmetric: zero point fixed at 0 when True (float grids are symmetric only).
        strategy: "tensor" | "channel" (one scale per output row) | "group" (per row and
            ``group_size`` consecutive inputs) | "token" (activations: per row of the last dim) |
            "block" (float: one scale per ``block_structure`` tile of a weight) | "tensor_group"
            (NVFP4: groups under a per-tensor global scale).
        group_size: required for (and only for) "group" / "tensor_group"; must divide the input dimension.
            FP4 takes 16 ("tensor_group", NVFP4: FP8 group scales) or 32 ("group", MXFP4: E8M0 scales).
        dynamic: False (static), True (scales computed on the fly from each tensor, activations) or "local"
            (NVFP4 activations: group scales per call under a calibrated global scale); "token" requires True.
        type: "int" or "float".
        block_structure: [rows, cols] of a "block" tile (a tuple; lists are converted).
    """

    num_bits: int = 4
    symmetric: bool = True
    strategy: str = "channel"
    group_size: int | None = None
    dynamic: bool | str = False
    type: str = "int"
    block_structure: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"type must be one of {', '.join(TYPES)}; got {self.type!r}")
        if isinstance(self.num_bits, bool) or int(self.num_bits) != self.num_bits or not 2 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be an integer in 2..8; got {self.num_bits!r}")
        if self.type == "float" and self.num_bits not in FLOAT_BITS:
            raise ValueError(f"num_bits for type 'float' must be one of 8 (FP8 E4M3), 4 (FP4 E2M1); got {self.num_bits!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if not (self.dynamic is True or self.dynamic is False or self.dynamic == "local"):
            raise ValueError(f"dynamic must be one of false, true, 'local'; got {self.dynamic!r}")
        if self.type == "int" and self.strategy in ("block", "tensor_group"):
            raise ValueError(f"strategy {self.strategy!r} needs type 'float'; for int use tensor, channel, group, token")
        if self.type == "float" and not self.symmetric:
            raise ValueError("float quantization is symmetric only; symmetric must be true")
        if self.strategy in ("group", "tensor_group"):
            if self.group_size is None or int(self.group_size) != self.group_size or self.group_size < 1:
                raise ValueError(f"group_size must be a positive integer for strategy {self.strategy!r}; "
                                 f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only allowed with strategy 'group'; got strategy {self.strategy!r}")
        if self.strategy == "block":
            bs = self.block_structure
            if (not isinstance(bs, (list, tuple)) or len(bs) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in bs)):
                raise ValueError(f"block_structure must be two positive integers [rows, cols] for strategy 'block'; "
                                 f"got {bs!r}")
            object.__setattr__(self, "block_structure", (int(bs[0]), int(bs[1])))
        elif self.block_structure is not None:
            raise ValueError(f"block_structure is only allowed with strategy 'block'; got strategy {self.strategy!r}")
        if self.type == "float" and self.num_bits == 4:
            if self.strategy == "tensor_group" and self.group_size != 16:
                raise ValueError(f"group_size for NVFP4 (FP4, strategy 'tensor_group') must be 16; got {self.group_size}")
            if self.strategy == "group" and self.group_size != 32:
                raise ValueError(f"group_size for MXFP4 (FP4, strategy 'group') must be 32; got {self.group_size}")
            if self.strategy not in ("group", "tensor_group"):
                raise ValueError("FP4 (type 'float', num_bits 4) needs strategy 'tensor_group' (NVFP4, group_size 16) "
                                 f"or 'group' (MXFP4, group_size 32); got {self.strategy!r}")
        if self.strategy == "token" and self.dynamic is not True:
            raise ValueError("strategy 'token' needs dynamic=True (per-token scales exist only at run time)")
        if self.dynamic == "local" and self.strategy != "tensor_group":
            raise ValueError("dynamic 'local' is only allowed with strategy 'tensor_group' (NVFP4 activations)")
        if self.dynamic is True and self.strategy in ("channel", "block"):
            raise ValueError(f"dynamic quantization takes strategy token, tensor, group or tensor_group; "
                             f"got {self.strategy!r}")

    @property
    def scale_format(self) -> str | None:
        """How a float scheme's scales are stored: "float8_e4m3fn" (NVFP4), "e8m0" (MXFP4), None (plain)."""
        if self.type != "float" or self.num_bits != 4:
            return None
        return "float8_e4m3fn" if self.strategy == "tensor_group" else "e8m0"

    @property
    def q_min(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def q_max(self) -> int:
        return 2 ** (self.num_bits - 1) - 1


def _grouped(w: Tensor, args: QuantArgs) -> Tensor:
    """View ``w [..., cols]`` as ``[..., cols // group_size, group_size]`` for group strategy."""
    cols = w.shape[-1]
    if cols % args.group_size:
        raise ValueError(f"group_size {args.group_size} must divide the input dimension {cols}")
    return w.unflatten(-1, (cols // args.group_size, args.group_size))


def observe_min_max(w: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """Per-strategy minima and maxima of ``w`` (shapes as the scale's, see the module docstring)."""
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(w)
        return lo.reshape(1), hi.reshape(1)
    if args.strategy == "group":
        g = _grouped(w, args)
        return g.amin(dim=-1), g.amax(dim=-1)
    # channel (a weight's rows) and token (an activation's rows) both reduce over the last dim.
    return w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)


def qparams_from_min_max(lo: Tensor, hi: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """Scale (dtype of ``lo``) and int8 zero point for observed minima/maxima of the same shape."""
    lo = torch.minimum(lo, torch.zeros_like(lo))  # 0 must be representable
    hi = torch.maximum(hi, torch.zeros_like(hi))
    q_range = float(args.q_max - args.q_min)
    if args.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / (q_range / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / q_range
        zero = (args.q_min - lo / scale).clamp(args.q_min, args.q_max)
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device)
    scale = torch.where(scale == 0, eps, scale)
    # An all-zero group gives 0/0 = NaN above; casting NaN to int is undefined, so pin it to 0
    # (what compressed-tensors' int8 cast of its NaN gave in tests/algorithms/test_quantization.py on CPU).
    zero = torch.nan_to_num(zero, nan=0.0).clamp(-128, 127).round().to(torch.int8)
    return scale, zero


def quantization_params(w: Tensor, args: QuantArgs, global_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Min/max scale and zero point for ``w`` (weights ``[rows, cols]``, activations ``[..., features]``).

    Returns ``(scale, zero_point)``: scale in ``w.dtype``, zero point int8, shaped per strategy
    (module docstring). Computed without gradient. Float grids: the zero point is all zeros (symmetric), and
    NVFP4 ("tensor_group") group scales are taken under ``global_scale`` (fp32 [1]; from ``w`` when None,
    ``float_quantization.global_scale``).
    """
    if not w.is_floating_point():
        raise ValueError(f"w must be a float tensor; got {w.dtype}")
    if args.type == "float":
        from service.algorithms import float_quantization as fq

        if args.strategy == "tensor_group" and global_scale is None:
            global_scale = fq.global_scale(w, args)
        scale = fq.float_scale(w, args, global_scale)
        return scale, torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    with torch.no_grad():
        lo, hi = observe_min_max(w.detach(), args)
        return qparams_from_min_max(lo, hi, args)


def _expand(t: Tensor, w: Tensor, args: QuantArgs) -> Tensor:
    """Broadcast a per-strategy ``scale``/``zero_point`` against the (grouped) view of ``w``."""
    if args.strategy == "group":
        return t.unsqueeze(-1)
    return t


def _check_params(scale: Tensor | None, zero_point: Tensor | None) -> None:
    if (scale is None) != (zero_point is None):
        raise ValueError("pass both scale and zero_point, or neither")


def quantize(w: Tensor, args: QuantArgs, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Integer codes of ``w``: int8 tensor of ``w``'s shape with values in ``[q_min, q_max]``."""
    view = _grouped(w, args) if args.strategy == "group" else w
    s = _expand(scale, w, args)
    z = _expand(zero_point, w, args).to(w.dtype)
    q = (view / s + z).clamp(args.q_min, args.q_max).round()
    return q.reshape(w.shape).to(torch.int8)


def dequantize(q: Tensor, args: QuantArgs, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Float values ``(q - zero_point) * scale`` in ``scale.dtype``, shaped like ``q``."""
    view = _grouped(q, args) if args.strategy == "group" else q
    s = _expand(scale, q, args)
    z = _expand(zero_point, q, args).to(scale.dtype)
    return ((view.to(scale.dtype) - z) * s).reshape(q.shape)


def _qdq(w: Tensor, args: QuantArgs, scale: Tensor, zero_point: Tensor) -> Tensor:
    # Kept in float (no int8 round trip) exactly like compressed-tensors' fused _quantize_dequantize.
    view = _grouped(w, args) if args.strategy == "group" else w
    s = _expand(scale, w, args).to(w.dtype)
    z = _expand(zero_point, w, args).to(w.dtype)
    q = (view / s + z).clamp(args.q_min, args.q_max).round()
    return ((q - z) * s).reshape(w.shape)


def fake_quantize(
    w: Tensor, args: QuantArgs, scale: Tensor | None = None, zero_point: Tensor | None = None,
    scale_grad: bool = False, global_scale: Tensor | None = None,
) -> Tensor:
    """Quantize-dequantize ``w``; same shape and dtype.

    Scale and zero point are computed from ``w`` (min/max) when not given. The backward pass is
    the straight-through estimator: ``d out / d w = 1`` everywhere (clipped values included), and
    no gradient flows into the scale, so a rotation ``R`` can be learned through
    ``fake_quantize(W @ R)``.

    ``scale_grad=True`` (scale computed from ``w``): the same forward values, bit for bit, but the
    scale (e.g. max|w| / 7.5) stays in the autograd graph and only the rounding is straight-through,
    so ``d out / d w`` also carries the effect of ``w`` on its own scale, and clipped entries pass no
    direct gradient. Learning per-channel scalings of ``w`` needs this: with the default, scaling a
    row up or down changes nothing the gradient can see.

    Float grids (``args.type == "float"``): the zero point is ignored, ``global_scale`` is NVFP4's (computed
    from ``w`` with the scale when neither is given); ``scale_grad`` is not supported.
    """
    if args.type == "float":
        return _fake_quantize_float(w, args, scale, global_scale, scale_grad)
    _check_params(scale, zero_point)
    if scale_grad:
        if scale is not None:
            raise ValueError("scale_grad: the scale is computed from w; pass no scale and zero_point")
        return _qdq_scale_grad(w, args)
    if scale is None:
        scale, zero_point = quantization_params(w, args)
    with torch.no_grad():
        out = _qdq(w.detach(), args, scale.detach(), zero_point)
    if not w.requires_grad:
        return out
    return w + (out - w).detach()


def _qdq_scale_grad(w: Tensor, args: QuantArgs) -> Tensor:
    # _qdq's arithmetic in the same order, with round() replaced by x + (round(x) - x).detach(): round(x) - x is
    # exact in any float dtype (it keeps x's own fractional bits), so the sum is round(x) exactly.
    lo, hi = observe_min_max(w, args)
    scale, zero_point = qparams_from_min_max(lo, hi, args)
    view = _grouped(w, args) if args.strategy == "group" else w
    s = _expand(scale, w, args).to(w.dtype)
    z = _expand(zero_point, w, args).to(w.dtype)
    x = (view / s + z).clamp(args.q_min, args.q_max)
    q = x + (x.round() - x).detach()
    return ((q - z) * s).reshape(w.shape)


def _fake_quantize_float(w, args, scale, global_scale, scale_grad):
    from service.algorithms import float_quantization as fq

    if scale_grad:
        raise ValueError("scale_grad is supported for integer grids only")
    if scale is None:
        if args.strategy == "tensor_group" and global_scale is None:
            global_scale = fq.global_scale(w, args)
        scale = fq.float_scale(w, args, global_scale)
    elif args.strategy == "tensor_group" and global_scale is None:
        raise ValueError("NVFP4 (tensor_group) needs the global_scale its group scales were taken under")
    with torch.no_grad():
        out = fq.qdq(w.detach(), args, scale.detach(), global_scale)
    if not w.requires_grad:
        return out
    return w + (out - w).detach()


def fake_quantize_activations(x: Tensor, args: QuantArgs, scale: Tensor | None = None,
                              global_scale: Tensor | None = None) -> Tensor:
    """Fake quantization of activations ``x [..., features]`` (straight-through gradient).

    "token": one scale per row of the last dim (per token); "tensor": one for all of ``x``;
    "group": per token and ``group_size`` consecutive features. Dynamic scales are recomputed per call.
    Float grids also take static schemes (FP8 per tensor: the calibrated ``scale``) and NVFP4's locally dynamic
    one (group scales per call under the calibrated ``global_scale``).
    """
    if args.strategy in ("channel", "block"):
        raise ValueError("activations are quantized per 'token', 'tensor', 'group' or 'tensor_group', not "
                         f"{args.strategy!r}")
    if args.type == "float":
        from service.algorithms.float_quantization import fake_quantize_float_activations

        with torch.no_grad():
            out = fake_quantize_float_activations(x.detach(), args, scale, global_scale)
        return out if not x.requires_grad else x + (out - x).detach()
    return fake_quantize(x, args)
