"""service/algorithms/quantization.py: integer quantization, bit-identical to compressed-tensors and by hand."""

import pytest
import torch

from service.algorithms.quantization import (
    QuantArgs, dequantize, fake_quantize, fake_quantize_activations, quantization_params, quantize,
)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import (  # noqa: E402
    calculate_qparams, compute_dynamic_scales_and_zp,
)

# ------------------------------------------------------------------------------------------------ the math


def _weight(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    w[3] = 0  # an all-zero row: eps scale
    w[4, :32] = 0  # an all-zero group
    w[5] = w[5].abs()  # all positive: asymmetric min is widened to 0
    w[6] = -w[6].abs()
    return w.to(dtype)


def _ct_min_max(w, strategy, group_size):
    if strategy == "tensor":
        return torch.aminmax(w)
    if strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    g = w.unflatten(-1, (w.shape[-1] // group_size, group_size))
    return g.amin(-1), g.amax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy, group_size", [("tensor", None), ("channel", None), ("group", 32), ("group", 8)])
def test_bit_identical_to_compressed_tensors(dtype, bits, symmetric, strategy, group_size):
    w = _weight(dtype)
    args = QuantArgs(bits, symmetric, strategy, group_size)
    ct_args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=group_size)
    ct_scale, ct_zero = calculate_qparams(*_ct_min_max(w, strategy, group_size), ct_args)
    scale, zero = quantization_params(w, args)
    assert scale.dtype == dtype and zero.dtype == torch.int8 and scale.shape == ct_scale.shape
    assert torch.equal(scale, ct_scale) and torch.equal(zero, ct_zero.to(torch.int8))
    assert torch.equal(fake_quantize(w, args), ct_fake_quantize(w, ct_scale, ct_zero, ct_args))
    codes = quantize(w, args, scale, zero)
    assert torch.equal(codes, ct_quantize(w, ct_scale, ct_zero, ct_args, dtype=torch.int8))
    assert torch.equal(dequantize(codes, args, scale, zero), fake_quantize(w, args))


def test_int4_symmetric_by_hand():
    """max|w| = 1.5 -> scale 1.5 / 7.5 = 0.2; codes in [-8, 7]; 1.5 clamps to 7, -1.5 rounds to -8."""
    w = torch.tensor([[1.5, -1.5, 0.1, 0.33, -0.29, 0.0, 0.75, 1.0]])
    args = QuantArgs(4, True, "channel")
    scale, zero = quantization_params(w, args)
    assert scale.item() == pytest.approx(0.2) and zero.item() == 0
    assert quantize(w, args, scale, zero).tolist() == [[7, -8, 0, 2, -1, 0, 4, 5]]


def test_int4_asymmetric_by_hand():
    """min -1, max 2 -> scale 3/15 = 0.2, zero point round(-8 + 5) = -3; 0 maps to exactly 0."""
    w = torch.tensor([[-1.0, 2.0, 0.0, 0.65]])
    args = QuantArgs(4, False, "channel")
    scale, zero = quantization_params(w, args)
    assert scale.item() == pytest.approx(0.2) and zero.item() == -3
    assert quantize(w, args, scale, zero).tolist() == [[-8, 7, -3, 0]]  # 0.65 / 0.2 - 3 = 0.25 -> 0
    assert fake_quantize(w, args)[0, 2].item() == 0.0


def test_straight_through_gradient():
    w = torch.randn(8, 32, requires_grad=True)
    g = torch.randn(8, 32)
    (fake_quantize(w, QuantArgs(4, True, "group", 16)) * g).sum().backward()
    assert torch.equal(w.grad, g)
    # A rotation learned through the quantizer gets a gradient (its own chain rule, not zero).
    rot = torch.eye(32, requires_grad=True)
    x = torch.randn(4, 32)
    y = x @ fake_quantize(w.detach() @ rot, QuantArgs(4)).T
    y.square().sum().backward()
    assert rot.grad is not None and rot.grad.abs().sum() > 0


def test_activations_per_token_match_slow_reference_and_compressed_tensors():
    x = torch.randn(2, 5, 64) * torch.linspace(0.1, 10, 64)
    args = QuantArgs(8, True, "token", dynamic=True)
    out = fake_quantize_activations(x, args)
    ref = torch.empty_like(x)
    for b in range(2):
        for t in range(5):
            row = x[b, t]
            scale = row.abs().max() / 127.5
            ref[b, t] = torch.clamp(torch.round(row / scale), -128, 127) * scale
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    ct_args = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
    ct_scale, ct_zero = compute_dynamic_scales_and_zp(x, ct_args, module=None)
    assert torch.equal(out, ct_fake_quantize(x, ct_scale, ct_zero, ct_args))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_bits": 1}, "num_bits"), ({"num_bits": 9}, "num_bits"), ({"strategy": "row"}, "strategy"),
     ({"strategy": "group"}, "group_size"), ({"group_size": 8}, "group_size"), ({"strategy": "token"}, "dynamic")],
)
def test_quant_args_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantArgs(**kwargs)
