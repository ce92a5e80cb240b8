"""service/algorithms/float_quantization.py: FP8 / NVFP4 / MXFP4 grids against a slow reference and against
compressed-tensors' own scale and fake-quantize functions (same values, bit for bit)."""

import math

import pytest
import torch

from service.algorithms import float_quantization as fq
from service.algorithms.quantization import QuantArgs, fake_quantize, fake_quantize_activations, quantization_params

ct = pytest.importorskip("compressed_tensors")

FP8_CHANNEL = QuantArgs(8, True, "channel", type="float")
FP8_TENSOR = QuantArgs(8, True, "tensor", type="float")
FP8_BLOCK = QuantArgs(8, True, "block", type="float", block_structure=(128, 128))
NVFP4 = QuantArgs(4, True, "tensor_group", 16, type="float")
MXFP4 = QuantArgs(4, True, "group", 32, type="float")


def _ct_preset(name, part="weights"):
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return PRESET_SCHEMES[name][part]


def _slow_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value by enumerating the grid; a tie goes to the even code (index in the magnitude grid)."""
    out = torch.empty_like(x)
    for i, v in enumerate(x.flatten().tolist()):
        a = min(abs(v), 6.0)
        dists = [abs(a - g) for g in fq.E2M1_GRID]
        best = min(dists)
        codes = [c for c, d in enumerate(dists) if d == best]
        code = next((c for c in codes if c % 2 == 0), codes[0])
        out.view(-1)[i] = math.copysign(fq.E2M1_GRID[code], v) if code else 0.0
    return out


def test_fp4_rounding_matches_enumeration_ties_included():
    grid = torch.tensor(fq.E2M1_GRID)
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, -grid, mids, -mids, torch.randn(300) * 3, torch.tensor([7.0, -100.0, 0.2499, 0.2501])])
    assert torch.equal(fq.round_to_fp4(x).abs(), _slow_fp4(x).abs())
    assert torch.equal(torch.sign(fq.round_to_fp4(x)), torch.sign(_slow_fp4(x)))


def test_fp4_rounding_matches_compressed_tensors():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    x = torch.randn(4096) * 4
    assert torch.equal(fq.round_to_fp4(x), cast_to_fp4(x.clone()))


def test_fp8_rounding_is_the_float8_round_trip():
    x = torch.randn(2000) * 300
    ref = x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(fq.round_to_fp8(x), ref)
    # every value lands on a representable e4m3 value
    assert torch.equal(fq.round_to_fp8(x).to(torch.float8_e4m3fn).float(), fq.round_to_fp8(x))


def _ct_weight_qdq(w, ct_args, strategy, group=None, block=None):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    if strategy == "tensor":
        lo, hi = torch.aminmax(w)
    elif strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    elif strategy == "block":
        b = w.reshape(w.shape[0] // block[0], block[0], w.shape[1] // block[1], block[1]).transpose(1, 2)
        lo, hi = b.amin(dim=(-2, -1)), b.amax(dim=(-2, -1))
    else:
        g = w.unflatten(-1, (-1, group))
        lo, hi = g.amin(-1), g.amax(-1)
    gs = None
    if strategy == "tensor_group":
        glo, ghi = torch.aminmax(w)
        gs = generate_gparam(glo, ghi)
    scale, zp = calculate_qparams(lo, hi, ct_args, global_scale=gs)
    return scale, gs, ct_fq(w, scale, zp, ct_args, global_scale=gs)


@pytest.mark.parametrize("preset,args,strategy", [
    ("FP8_DYNAMIC", FP8_CHANNEL, "channel"),
    ("FP8", FP8_TENSOR, "tensor"),
    ("FP8_BLOCK", FP8_BLOCK, "block"),
    ("NVFP4A16", NVFP4, "tensor_group"),
    ("MXFP4", MXFP4, "group"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_fake_quantize_matches_compressed_tensors(preset, args, strategy, dtype):
    torch.manual_seed(0)
    w = (torch.randn(256, 384) * torch.logspace(-3, 1, 384)).to(dtype)
    w[3] = 0  # an all-zero row / group
    ct_scale, ct_gs, ct_out = _ct_weight_qdq(w, _ct_preset(preset), strategy, args.group_size, args.block_structure)
    gs = fq.global_scale(w, args) if strategy == "tensor_group" else None
    scale, zero = quantization_params(w, args, global_scale=gs)
    if gs is not None:
        assert torch.equal(gs, ct_gs)
    assert torch.equal(scale.to(ct_scale.dtype), ct_scale)
    assert not zero.any()
    out = fake_quantize(w, args, scale, zero, global_scale=gs)
    assert out.dtype == w.dtype
    assert torch.equal(out, ct_out.to(w.dtype))
    # idempotent: the fake-quantized weight is on the grid of its own scales
    assert torch.equal(fake_quantize(out, args, scale, zero, global_scale=gs), out)


def test_mx_scales_are_powers_of_two_and_fp4_values_times_scale():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    scale, _ = quantization_params(w, MXFP4)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())
    q = fq.codes(w, MXFP4, scale)
    assert set(q.abs().unique().tolist()) <= set(fq.E2M1_GRID)
    assert torch.equal(fq.dequantize(q, MXFP4, scale), fake_quantize(w, MXFP4, scale))


def test_nvfp4_group_scales_are_fp8_values():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    gs = fq.global_scale(w, NVFP4)
    scale, _ = quantization_params(w, NVFP4, global_scale=gs)
    assert torch.equal(scale.to(torch.float8_e4m3fn).float(), scale)
    assert gs.dtype == torch.float32 and gs.shape == (1,)
    assert math.isclose(gs.item(), 448 * 6 / w.abs().max().item(), rel_tol=1e-6)


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK", "MXFP4"])
def test_dynamic_activations_match_compressed_tensors(preset):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from service.recipes.quantization_modifiers import PRESET_SCHEMES, quant_args_from_dict

    torch.manual_seed(3)
    x = torch.randn(2, 7, 256) * 5
    ct_args = _ct_preset(preset, "input_activations")
    s, z = compute_dynamic_scales_and_zp(x, ct_args, module=None)
    ref = ct_fq(x, s, z, ct_args)
    ours, _ = quant_args_from_dict(PRESET_SCHEMES[preset]["input_activations"], "x")
    assert torch.equal(fake_quantize_activations(x, ours), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_and_local_activations_match_compressed_tensors(dtype):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.utils import (
        calculate_qparams, compute_dynamic_scales_and_zp, generate_gparam,
    )

    torch.manual_seed(4)
    batches = [(torch.randn(2, 5, 64) * (i + 1)).to(dtype) for i in range(3)]
    observed = fq.ActivationRange()
    for b in batches:
        observed.add(b)
    allx = torch.cat([b.flatten() for b in batches])
    lo, hi = torch.aminmax(allx)
    # FP8 static per tensor
    fp8 = QuantArgs(8, True, "tensor", type="float")
    params = fq.static_input_params(observed, fp8, dtype)
    ct_scale, ct_zp = calculate_qparams(lo, hi, _ct_preset("FP8", "input_activations"))
    assert torch.equal(params["input_scale"], ct_scale)
    x = batches[1]
    assert torch.equal(fake_quantize_activations(x, fp8, scale=params["input_scale"]),
                       ct_fq(x, ct_scale, ct_zp, _ct_preset("FP8", "input_activations")))
    # NVFP4: calibrated global scale, group scales per call
    nv = QuantArgs(4, True, "tensor_group", 16, dynamic="local", type="float")
    params = fq.static_input_params(observed, nv, dtype)
    ct_gs = generate_gparam(lo, hi)
    assert torch.equal(params["input_global_scale"], ct_gs)
    ct_args = _ct_preset("NVFP4", "input_activations")
    s, z = compute_dynamic_scales_and_zp(x, ct_args, module=None, global_scale=ct_gs)
    assert torch.equal(fake_quantize_activations(x, nv, global_scale=params["input_global_scale"]),
                       ct_fq(x, s, z, ct_args, global_scale=ct_gs))


@pytest.mark.parametrize("args", [FP8_CHANNEL, FP8_BLOCK, NVFP4, MXFP4])
def test_gptq_float_beats_rtn_on_the_hessian_loss_and_stays_on_the_grid(args):
    torch.manual_seed(5)
    rows, cols = 128, 128
    x = torch.randn(512, cols) @ torch.randn(cols, cols) * 0.3
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(rows, cols) * 0.2
    res = fq.gptq_quantize_float(w, H, args, block_size=32)
    gs = res.global_scale
    assert torch.equal(fake_quantize(res.q_weight, args, res.scale, global_scale=gs), res.q_weight)
    rtn = fake_quantize(w, args, global_scale=fq.global_scale(w, args) if gs is not None else None)

    def out_err(q):
        return ((x @ (w - q).T) ** 2).sum().item()

    assert out_err(res.q_weight) < out_err(rtn)


def test_gptq_float_keeps_pruned_zeros():
    torch.manual_seed(6)
    x = torch.randn(256, 64)
    H = 2 * x.T @ x / 256
    w = torch.randn(32, 64)
    w[:, ::2] = 0
    res = fq.gptq_quantize_float(w, H, NVFP4, preserve_sparsity_mask=True)
    assert (res.q_weight[:, ::2] == 0).all()


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_bits=4, strategy="tensor_group", group_size=32, type="float"), "group_size for NVFP4"),
    (dict(num_bits=4, strategy="group", group_size=16, type="float"), "group_size for MXFP4"),
    (dict(num_bits=4, strategy="channel", type="float"), "FP4"),
    (dict(num_bits=6, strategy="channel", type="float"), "num_bits"),
    (dict(num_bits=8, symmetric=False, strategy="channel", type="float"), "symmetric"),
    (dict(num_bits=8, strategy="block", type="float"), "block_structure"),
    (dict(num_bits=8, strategy="block", type="float", block_structure=(0, 128)), "block_structure"),
    (dict(num_bits=8, strategy="block", block_structure=(128, 128)), "type 'float'"),
    (dict(num_bits=8, strategy="tensor", type="float", dynamic="local"), "local"),
    (dict(num_bits=8, strategy="tensor", type="fp"), "type"),
])
def test_bad_float_args_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantArgs(**kwargs)


def test_block_shape_must_divide():
    w = torch.randn(100, 256)
    with pytest.raises(ValueError, match="block_structure"):
        quantization_params(w, FP8_BLOCK)
