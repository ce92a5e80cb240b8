import logging

import pytest
import torch

from service.algorithms.hessian import HessianAccumulator
from service.algorithms.magnitude import magnitude_prune
from service.algorithms.sparsegpt import SparseGPTError, SparseGPTResult, sparsegpt_prune

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(rows, cols, samples=3, seq=16, seed=0, correlated=True):
    """Random weight, calibration inputs X [samples, seq, cols] and their Hessian."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(samples, seq, cols, generator=gen)
    if correlated:
        # Real activations are strongly correlated across channels; that is what SparseGPT exploits.
        mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=gen) / cols**0.5
        x = x @ mix
    acc = HessianAccumulator(cols)
    acc.add(x)
    return weight, x, acc.hessian


def _obs_reference(weight, hessian, dampening_frac, *, keep=None, sparsity=0.0, block_size=None, nm=None):
    """Unblocked OBS in fp64 with an explicit inverse.

    Column by column: every row that prunes column q takes the optimal update
    w -= w_q / Hinv_qq * Hinv[q, :]; then q is removed from Hinv (rank-1 downdate),
    so later columns are compensated only on the still-free weights.
    The mask is either given (``keep``) or chosen as the paper does: for N:M at each group's
    first column from the current weights, w^2 / U_jj^2 with U = chol(Hinv, upper); for
    unstructured at each block's first column, the int(sparsity * numel) lowest of the block.
    Returns (weight, keep, loss) with loss = sum over pruned of w_q^2 / Hinv_qq / 2.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(dampening_frac * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    d2 = torch.linalg.cholesky(Hinv, upper=True).diagonal() ** 2  # Hinv_jj at the time j is reached
    choose = keep is None
    keep = torch.ones(rows, cols, dtype=torch.bool) if choose else keep.clone()
    loss = 0.0
    for q in range(cols):
        if choose and nm is not None and q % nm[1] == 0:
            group = slice(q, q + nm[1])
            scores = W[:, group] ** 2 / d2[group]
            lowest = scores.topk(nm[0], dim=1, largest=False).indices
            keep[:, group].scatter_(1, lowest, False)
        if choose and nm is None and q % block_size == 0:
            block = slice(q, min(q + block_size, cols))
            scores = (W[:, block] ** 2 / d2[block]).flatten()
            block_keep = torch.ones_like(scores, dtype=torch.bool)
            block_keep[scores.topk(int(sparsity * scores.numel()), largest=False).indices] = False
            keep[:, block] = block_keep.reshape(rows, -1)
        pruned = ~keep[:, q]
        coef = torch.where(pruned, W[:, q], torch.zeros_like(W[:, q])) / Hinv[q, q]
        loss += float((coef**2).sum() * Hinv[q, q] / 2)
        W -= coef[:, None] * Hinv[q][None, :]
        W[pruned, q] = 0.0
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return W, keep, loss


def _output_error(w_new, w_old, x):
    flat = x.reshape(-1, x.shape[-1])
    return float(((flat @ w_old.T - flat @ w_new.T) ** 2).sum())


@pytest.mark.parametrize("mask_structure, sparsity", [((0, 0), 0.5), ((0, 0), 0.3), ((2, 4), 0.5), ((1, 4), 0.0)])
@pytest.mark.parametrize("block_size", [1, 3, 24, 128])
def test_matches_unblocked_obs_reference(mask_structure, sparsity, block_size):
    weight, _, hessian = _data(10, 24, samples=3, seq=12, seed=block_size)
    result = sparsegpt_prune(weight, hessian, sparsity, mask_structure=mask_structure, block_size=block_size)
    assert isinstance(result, SparseGPTResult)
    ref, _, ref_loss = _obs_reference(weight, hessian, result.dampening_frac, keep=result.mask)
    torch.testing.assert_close(result.weight.double(), ref, rtol=1e-4, atol=2e-4)
    assert result.loss == pytest.approx(ref_loss, rel=1e-3)
    assert (result.weight[~result.mask] == 0).all()


@pytest.mark.parametrize("mask_structure", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_is_chosen_from_updated_weights(mask_structure):
    weight, _, hessian = _data(12, 32, samples=2, seq=24, seed=21)
    result = sparsegpt_prune(weight, hessian, 0.5, mask_structure=mask_structure, block_size=16)
    ref, ref_keep, ref_loss = _obs_reference(weight, hessian, 0.01, nm=mask_structure)
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight.double(), ref, rtol=1e-4, atol=2e-4)
    assert result.loss == pytest.approx(ref_loss, rel=1e-3)


@pytest.mark.parametrize("block_size", [4, 7, 32])
def test_unstructured_mask_is_chosen_per_block(block_size):
    weight, _, hessian = _data(12, 32, samples=2, seq=24, seed=22)
    result = sparsegpt_prune(weight, hessian, 0.5, block_size=block_size)
    ref, ref_keep, ref_loss = _obs_reference(weight, hessian, 0.01, sparsity=0.5, block_size=block_size)
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight.double(), ref, rtol=1e-4, atol=2e-4)
    assert result.loss == pytest.approx(ref_loss, rel=1e-3)


def test_nm_mask_does_not_depend_on_block_size():
    weight, _, hessian = _data(16, 32, seed=5)
    masks = [sparsegpt_prune(weight, hessian, 0.5, mask_structure=(2, 4), block_size=b).mask for b in (1, 4, 6, 8, 32)]
    for mask in masks[1:]:
        assert torch.equal(mask, masks[0])


@pytest.mark.parametrize("mask_structure", [(0, 0), (2, 4)])
def test_output_error_below_magnitude(mask_structure):
    weight, x, hessian = _data(64, 128, samples=4, seq=64, seed=7)
    sgpt = sparsegpt_prune(weight, hessian, 0.5, mask_structure=mask_structure)
    mag, mag_mask = magnitude_prune(weight, 0.5, mask_structure=mask_structure)
    assert (~sgpt.mask).sum() == (~mag_mask).sum()
    err_sgpt = _output_error(sgpt.weight, weight, x)
    err_mag = _output_error(mag, weight, x)
    assert err_sgpt < 0.92 * err_mag, (err_sgpt, err_mag)


def test_sparsity_zero_is_bit_identical():
    weight, _, hessian = _data(8, 16)
    weight = weight.half()
    weight[0, 0] = 0.0
    w_before, h_before = weight.clone(), hessian.clone()
    result = sparsegpt_prune(weight, hessian, 0.0)
    assert result.weight.dtype == torch.float16
    assert torch.equal(result.weight, weight) and result.weight.data_ptr() != weight.data_ptr()
    assert result.mask.all() and result.loss == 0.0
    # with preserve, the existing zero is reported pruned and the weight still unchanged
    result = sparsegpt_prune(weight, hessian, 0.0, preserve_sparsity_mask=True)
    assert torch.equal(result.weight, weight)
    assert int((~result.mask).sum()) == 1 and not result.mask[0, 0]
    assert torch.equal(weight, w_before) and torch.equal(hessian, h_before)


def test_inputs_not_mutated():
    weight, _, hessian = _data(8, 16)
    hessian[3, :] = 0
    hessian[:, 3] = 0  # a dead input: the function edits its own copy of H
    w_before, h_before = weight.clone(), hessian.clone()
    for structure in [(0, 0), (2, 4)]:
        sparsegpt_prune(weight, hessian, 0.5, mask_structure=structure, preserve_sparsity_mask=True)
    assert torch.equal(weight, w_before) and torch.equal(hessian, h_before)


@pytest.mark.parametrize("sparsity", [0.5, 0.25, 0.75])
def test_unstructured_count_is_exact(sparsity):
    weight, _, hessian = _data(16, 64, seed=3)
    result = sparsegpt_prune(weight, hessian, sparsity, block_size=16)
    assert int((~result.mask).sum()) == int(sparsity * weight.numel())
    assert int((result.weight == 0).sum()) == int(sparsity * weight.numel())


def test_unstructured_count_per_block_with_ragged_last_block():
    weight, _, hessian = _data(10, 30, seed=4)
    result = sparsegpt_prune(weight, hessian, 0.3, block_size=7)
    blocks = [7, 7, 7, 7, 2]
    assert int((~result.mask).sum()) == sum(int(0.3 * 10 * b) for b in blocks)
    start = 0
    for b in blocks:
        assert int((~result.mask[:, start : start + b]).sum()) == int(0.3 * 10 * b)
        start += b


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_every_group_has_n_zeros(n, m):
    weight, _, hessian = _data(12, 32, seed=n + m)
    result = sparsegpt_prune(weight, hessian, 0.123, mask_structure=(n, m), block_size=6)
    zeros = (result.weight == 0).reshape(12, 32 // m, m).sum(-1)
    pruned = (~result.mask).reshape(12, 32 // m, m).sum(-1)
    assert (zeros >= n).all() and (pruned == n).all()


@pytest.mark.parametrize("mask_structure", [(0, 0), (2, 4)])
def test_preserve_sparsity_mask_keeps_existing_zeros(mask_structure):
    weight, _, hessian = _data(16, 32, seed=11)
    existing = torch.rand(16, 32, generator=torch.Generator().manual_seed(0)) < 0.3
    weight[existing] = 0.0
    result = sparsegpt_prune(weight, hessian, 0.5, mask_structure=mask_structure, preserve_sparsity_mask=True)
    assert (result.weight[existing] == 0).all()
    assert not result.mask[existing].any()
    if mask_structure == (0, 0):
        assert int((~result.mask).sum()) == max(int(0.5 * weight.numel()), int(existing.sum()))
    else:
        per_group = (~result.mask).reshape(16, 8, 4).sum(-1)
        existing_per_group = existing.reshape(16, 8, 4).sum(-1)
        assert torch.equal(per_group, existing_per_group.clamp(min=2))
        # without preserve, groups holding more than n old zeros get some of them refilled
        plain = sparsegpt_prune(weight, hessian, 0.5, mask_structure=mask_structure)
        assert (plain.weight[existing] != 0).any()


def test_preserve_beyond_target_only_prunes_existing():
    weight, _, hessian = _data(8, 16, seed=12)
    existing = torch.rand(8, 16, generator=torch.Generator().manual_seed(1)) < 0.6
    weight[existing] = 0.0
    result = sparsegpt_prune(weight, hessian, 0.25, block_size=16, preserve_sparsity_mask=True)
    assert torch.equal(~result.mask, existing)


def test_dead_inputs_give_zero_columns_and_no_nan():
    weight, x, _ = _data(8, 16, seed=13)
    x[..., [2, 9]] = 0.0
    acc = HessianAccumulator(16)
    acc.add(x)
    for structure in [(0, 0), (2, 4)]:
        result = sparsegpt_prune(weight, acc.hessian, 0.5, mask_structure=structure)
        assert torch.isfinite(result.weight).all() and torch.isfinite(torch.tensor(result.loss))
        assert (result.weight[:, [2, 9]] == 0).all()
    # all inputs dead: still defined
    result = sparsegpt_prune(weight, torch.zeros(16, 16), 0.5)
    assert torch.isfinite(result.weight).all() and (result.weight == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_structure", [(0, 0), (2, 4)])
def test_half_precision_weights(dtype, mask_structure):
    weight, _, hessian = _data(16, 32, seed=14)
    low = weight.to(dtype)
    result = sparsegpt_prune(low, hessian, 0.5, mask_structure=mask_structure)
    ref = sparsegpt_prune(low.float(), hessian, 0.5, mask_structure=mask_structure)
    assert result.weight.dtype == dtype and result.weight.device == low.device
    assert torch.equal(result.mask, ref.mask)
    # the same fp32 computation, rounded once at the end
    assert torch.equal(result.weight, ref.weight.to(dtype))
    torch.testing.assert_close(result.weight.float(), ref.weight, rtol=1e-2, atol=1e-2)
    assert (result.weight[~result.mask] == 0).all()


def test_cholesky_failure_recovers_by_retry(caplog):
    gen = torch.Generator().manual_seed(15)
    a = torch.randn(16, 64, generator=gen)
    h = a @ a.T / 64
    # Shift so the smallest eigenvalue is -5% of mean(diag): 1% dampening fails, 10% succeeds.
    shift = float(torch.linalg.eigvalsh(h)[0]) + 0.05 * float(h.diagonal().mean())
    h -= shift * torch.eye(16)
    weight = torch.randn(8, 16, generator=gen)
    with caplog.at_level(logging.DEBUG):
        result = sparsegpt_prune(weight, h, 0.5, dampening_frac=0.01)
    assert result.dampening_frac == pytest.approx(0.1)
    assert not caplog.records  # a pure function: the modifier, which knows the module, is the one to warn
    assert int((~result.mask).sum()) == 64 and torch.isfinite(result.weight).all()

    from types import SimpleNamespace

    from service.recipes.pruning_modifiers import SparseGPTModifier

    linear = torch.nn.Linear(16, 8, bias=False)
    linear.weight.data.copy_(weight)
    with caplog.at_level(logging.WARNING, logger="service.recipes.layerwise_modifier"):
        report = SparseGPTModifier(sparsity=0.5, dampening_frac=0.01).compress_module("layers.0.q", linear,
                                                                                      SimpleNamespace(hessian=h), 0.5)
    assert report["dampening_frac"] == pytest.approx(0.1)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "layers.0.q" in messages[0] and "0.01" in messages[0] and "0.1" in messages[0]


def test_singular_hessian_with_zero_dampening_recovers():
    h = torch.eye(8)
    h[:2, :2] = 4.0  # two identical inputs: exactly singular
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(16))
    result = sparsegpt_prune(weight, h, 0.5, dampening_frac=0.0)
    assert result.dampening_frac == pytest.approx(1e-4)  # zero cannot grow tenfold: the retries start there
    assert torch.isfinite(result.weight).all() and int((~result.mask).sum()) == 16


def test_negative_definite_hessian_raises():
    gen = torch.Generator().manual_seed(17)
    a = torch.randn(8, 32, generator=gen)
    h = -(a @ a.T / 32 + torch.eye(8))
    with pytest.raises(SparseGPTError, match=r"dampening_frac=100 \(started at 0.01, 4 retries\)"):
        sparsegpt_prune(torch.randn(4, 8, generator=gen), h, 0.5)
    h_nan = torch.eye(8)
    h_nan[1, 2] = h_nan[2, 1] = float("nan")
    with pytest.raises(SparseGPTError):
        sparsegpt_prune(torch.randn(4, 8, generator=gen), h_nan, 0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=float("nan")), "sparsity"),
        (dict(sparsity=0.5, block_size=0), "block_size"),
        (dict(sparsity=0.5, mask_structure=(4, 4)), "mask_structure"),
        (dict(sparsity=0.5, mask_structure=(3, 2)), "mask_structure"),
        (dict(sparsity=0.5, mask_structure=(2, 5)), "divisible"),
        (dict(sparsity=0.5, dampening_frac=-0.01), "dampening_frac"),
    ],
)
def test_bad_arguments(kwargs, field):
    weight, _, hessian = _data(4, 8)
    with pytest.raises(ValueError, match=field):
        sparsegpt_prune(weight, hessian, **kwargs)


def test_bad_shapes():
    weight, _, hessian = _data(4, 8)
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune(weight, hessian[:4, :4], 0.5)
    with pytest.raises(ValueError, match="weight"):
        sparsegpt_prune(weight.flatten(), hessian, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device_and_keeps_device(device):
    weight, _, hessian = _data(32, 64, seed=18)
    cpu = sparsegpt_prune(weight, hessian, 0.5, mask_structure=(2, 4), block_size=16)
    result = sparsegpt_prune(weight.to(device), hessian, 0.5, mask_structure=(2, 4), block_size=16)
    assert result.weight.device.type == device and result.mask.device.type == device
    torch.testing.assert_close(result.weight.cpu(), cpu.weight, rtol=1e-3, atol=1e-3)
    assert result.loss == pytest.approx(cpu.loss, rel=1e-3)
