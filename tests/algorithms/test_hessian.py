import pytest
import torch

from service.algorithms.hessian import HessianAccumulator, InputNormAccumulator


def _direct(batches):
    """2/n * sum over all tokens of x x^T with n = samples (llm-compressor's count), in fp64."""
    total = None
    samples = 0
    for x in batches:
        samples += x.shape[0] if x.dim() >= 3 else 1
        flat = x.reshape(-1, x.shape[-1]).double()
        outer = flat.T @ flat
        total = outer if total is None else total + outer
    return 2.0 / samples * total, samples


def _batches(gen, columns, dtype=torch.float32):
    return [
        torch.randn(2, 5, columns, generator=gen).to(dtype),
        torch.randn(7, columns, generator=gen).to(dtype),  # 2-D: one sample
        torch.randn(3, 4, columns, generator=gen).to(dtype),
        torch.randn(1, 9, columns, generator=gen).to(dtype),
    ]


def test_running_mean_equals_direct_formula():
    gen = torch.Generator().manual_seed(0)
    batches = _batches(gen, 6)
    acc = HessianAccumulator(6)
    for x in batches:
        acc.add(x)
    expected, samples = _direct(batches)
    assert acc.num_samples == samples == 2 + 1 + 3 + 1
    assert acc.hessian.dtype == torch.float32 and acc.hessian.shape == (6, 6)
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_matches_llm_compressor_formula_for_one_batch():
    # llm-compressor: H *= n/(n+a); n += a; H += (sqrt(2/n) x)^T (sqrt(2/n) x)
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    ref = torch.zeros(5, 5)
    n = 0
    for x in (x1, x2):
        ref *= n / (n + x.shape[0])
        n += x.shape[0]
        flat = (2 / n) ** 0.5 * x.reshape(-1, 5)
        ref += flat.T @ flat
    acc = HessianAccumulator(5)
    acc.add(x1)
    acc.add(x2)
    torch.testing.assert_close(acc.hessian, ref, rtol=1e-5, atol=1e-6)


def test_merge_of_two_halves_equals_one_pass():
    gen = torch.Generator().manual_seed(2)
    batches = _batches(gen, 8)
    one = HessianAccumulator(8)
    for x in batches:
        one.add(x)
    a, b = HessianAccumulator(8), HessianAccumulator(8)
    for x in batches[:1]:
        a.add(x)
    for x in batches[1:]:
        b.add(x)
    a.merge(b)
    assert a.num_samples == one.num_samples
    torch.testing.assert_close(a.hessian, one.hessian, rtol=1e-5, atol=1e-6)
    # merging into / from an empty accumulator is the identity
    empty = HessianAccumulator(8)
    empty.merge(one)
    torch.testing.assert_close(empty.hessian, one.hessian)
    before = one.hessian.clone()
    one.merge(HessianAccumulator(8))
    assert torch.equal(one.hessian, before)
    with pytest.raises(ValueError, match="columns"):
        one.merge(HessianAccumulator(7))


def test_bf16_input_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(3)
    batches = _batches(gen, 6, dtype=torch.bfloat16)
    acc = HessianAccumulator(6)
    for x in batches:
        acc.add(x)
    assert acc.hessian.dtype == torch.float32
    expected, _ = _direct(batches)  # same bf16 values, exact arithmetic
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_shape_and_to():
    acc = HessianAccumulator(4, device="cpu")
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        acc.add(torch.randn(3, 5))
    acc.add(torch.randn(3, 4))
    moved = acc.to("cpu")
    assert moved is acc and acc.hessian.device.type == "cpu"


def test_input_norm_accumulator():
    gen = torch.Generator().manual_seed(4)
    batches = _batches(gen, 5)
    acc = InputNormAccumulator(5)
    for x in batches:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 5) for x in batches])
    assert acc.num_tokens == flat.shape[0]
    assert acc.squared_norm.dtype == torch.float32 and acc.squared_norm.shape == (5,)
    torch.testing.assert_close(acc.squared_norm, (flat.double() ** 2).sum(0).float(), rtol=1e-5, atol=1e-5)
    a, b = InputNormAccumulator(5), InputNormAccumulator(5)
    a.add(batches[0])
    for x in batches[1:]:
        b.add(x)
    a.merge(b)
    assert a.num_tokens == acc.num_tokens
    torch.testing.assert_close(a.squared_norm, acc.squared_norm)
    bf = InputNormAccumulator(5)
    bf.add(batches[0].bfloat16())
    torch.testing.assert_close(bf.squared_norm, (batches[0].bfloat16().double() ** 2).sum((0, 1)).float())
    with pytest.raises(ValueError, match="5"):
        acc.add(torch.randn(2, 4))


@pytest.mark.parametrize("columns", [512, 1030])
def test_wide_inputs_use_the_block_triangle_and_stay_exact(columns):
    """Wide Hessians are computed as an upper block-triangle and mirrored: same value, exactly symmetric."""
    torch.manual_seed(0)
    acc = HessianAccumulator(columns)
    xs = [torch.randn(3, 40, columns), torch.randn(2, 30, columns)]
    for x in xs:
        acc.add(x)
    tokens = torch.cat([x.reshape(-1, columns) for x in xs]).double()
    expected = 2.0 / 5 * tokens.T @ tokens
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.hessian, acc.hessian.T)
    other = HessianAccumulator(columns)
    other.add(xs[1])
    half = HessianAccumulator(columns)
    half.add(xs[0])
    half.merge(other)
    torch.testing.assert_close(half.hessian, acc.hessian, rtol=1e-5, atol=1e-4)
