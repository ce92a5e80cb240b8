"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS error compensation.

Weight and Hessian in; pruned weight, keep mask and loss out. The math follows
IST-DASLab's ``fasterprune`` and llm-compressor's ``sparsify_weight`` so that the
reported loss is comparable with llm-compressor's, with these deliberate differences:

* unstructured blocks prune exactly ``int(sparsity * block numel)`` weights; the
  reference's ``score <= sorted[k]`` prunes one more per block (and prunes the
  minimum even at sparsity 0);
* for N:M the block size is rounded down to a multiple of M (at least M) so every
  group's mask is chosen from fully updated weights; the reference lets a block
  boundary cut a group in two;
* a failed Cholesky is retried with more dampening and finally raises
  :class:`SparseGPTError`; the reference silently falls back to an identity Hinv;
* ``preserve_sparsity_mask`` treats existing zeros as forced prunes inside the
  ordinary OBS update instead of masking them out of the lazy batch update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.algorithms.hessian import HessianError, inverse_hessian_factor
from service.algorithms.masks import nm_keep_mask, unstructured_keep_mask, validate_mask_structure, validate_sparsity


@dataclass(frozen=True)
class SparseGPTResult:
    """Outcome of :func:`sparsegpt_prune`.

    Attributes:
        weight: [out, in], same dtype and device as the input weight: pruned and error-compensated.
        mask: bool [out, in], True where the weight was kept (not selected for pruning).
            A kept weight can still be zero (e.g. a dead input column).
        loss: llm-compressor's reported loss, ``sum (w - q)^2 / U_ii^2 / 2`` over rows and columns.
        dampening_frac: the dampening fraction finally used (after any retries).
    """

    weight: Tensor
    mask: Tensor
    loss: float
    dampening_frac: float


# The name SparseGPT callers catch; the factorisation is shared with GPTQ (service.algorithms.hessian).
SparseGPTError = HessianError


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    mask_structure: tuple[int, int] = (0, 0),
    block_size: int = 128,
    dampening_frac: float = 0.01,
    preserve_sparsity_mask: bool = False,
) -> SparseGPTResult:
    """Prune ``weight`` with SparseGPT, compensating each pruned weight on the not-yet-processed columns.

    Args:
        weight: [out, in] float tensor (any float dtype); not modified.
        hessian: [in, in] ``2/n sum x x^T`` (see ``HessianAccumulator``), any device; not modified.
        sparsity: fraction in [0, 1) pruned per block of columns (unstructured); ignored for N:M.
        mask_structure: ``(0, 0)`` for unstructured or ``(N, M)``: N of every M consecutive inputs pruned.
        block_size: columns per lazy-update block (>= 1); rounded down to a multiple of M for N:M.
        dampening_frac: fraction of ``mean(diag H)`` added to the diagonal (>= 0); multiplied by 10 on
            each Cholesky failure, up to 4 retries.
        preserve_sparsity_mask: weights already exactly zero are always pruned (counted first
            toward each block's or group's budget), so the existing pattern is only added to.
    Returns:
        :class:`SparseGPTResult`. All work is fp32 on ``weight.device``.
    Raises:
        ValueError: bad arguments or shapes. SparseGPTError: the Hessian cannot be factorised.
    """
    n, m = validate_mask_structure(mask_structure)
    validate_sparsity(sparsity)
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}")
    if not dampening_frac >= 0.0:  # also rejects NaN
        raise ValueError(f"dampening_frac must be >= 0; got {dampening_frac!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in]; got {weight.dtype} {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}] for weight {tuple(weight.shape)}; got {tuple(hessian.shape)}")
    if n and cols % m:
        raise ValueError(f"N:M pruning with M={m} needs the input dimension divisible by {m}; weight is {tuple(weight.shape)}")

    forced = (weight == 0) if preserve_sparsity_mask else None
    if n == 0 and sparsity == 0:
        # Nothing to prune: skip the Hessian entirely so the weight comes back bit-identical.
        mask = ~forced if forced is not None else torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
        return SparseGPTResult(weight.detach().clone(), mask, 0.0, float(dampening_frac))

    # Work on W^T [in, out]: the algorithm walks the input columns one at a time, and in this
    # layout each is a contiguous row, so the per-column rank-1 update is a contiguous GEMM
    # (measured 3.5x faster than addr_ on column slices of W at 1024 rows, one thread).
    Wt = weight.detach().T.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    H = hessian.detach().to(device=Wt.device, dtype=torch.float32, copy=True)

    # An input that was always zero carries no information: make its Hessian row invertible
    # and its weights zero (they can never affect the output on the calibration data).
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)
    Wt.masked_fill_(dead.unsqueeze(1), 0.0)

    U, used_frac = inverse_hessian_factor(H, float(dampening_frac))
    del H

    if n:
        block_size = max(m, block_size // m * m)
    forced_t = forced.T if forced is not None else None
    pruned_t = torch.zeros(cols, rows, dtype=torch.bool, device=Wt.device)
    err_buffer = torch.empty(min(block_size, cols), rows, dtype=torch.float32, device=Wt.device)
    loss = torch.zeros((), dtype=torch.float32, device=Wt.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = Wt[i1:i2]  # views, updated in place
        P1 = pruned_t[i1:i2]
        E1 = err_buffer[:count]
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        F1 = forced_t[i1:i2] if forced_t is not None else None

        if n == 0:
            # OBS saliency w^2 / [H^-1]_jj, with the diagonal of the current (downdated) inverse;
            # ranked as [rows, count] so ties fall in row-major order like everywhere else.
            scores = (W1.square() / d1.square().unsqueeze(1)).T
            keep1 = unstructured_keep_mask(scores, sparsity, forced_prune=F1.T if F1 is not None else None)
            torch.logical_not(keep1.T, out=P1)

        for i in range(count):
            if n and i % m == 0:
                # Choose the group's mask only now, from weights updated by all earlier columns.
                g = slice(i, i + m)
                scores = (W1[g].square() / d1[g].square().unsqueeze(1)).T
                keep_g = nm_keep_mask(scores, n, m, forced_prune=F1[g].T if F1 is not None else None)
                torch.logical_not(keep_g.T, out=P1[g])
            w = W1[i]
            torch.mul(w, P1[i], out=E1[i])  # the pruned part of w (kept entries -> 0)
            E1[i] /= d1[i]
            # Spread this column's error over the block's remaining columns, then fix the column.
            W1[i + 1 :].addmm_(U1[i, i + 1 :].unsqueeze(1), E1[i].unsqueeze(0), alpha=-1.0)
            w.masked_fill_(P1[i], 0.0)

        loss += E1.square().sum() / 2
        # Lazy batch update: one GEMM carries the whole block's error to the later columns.
        Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)

    return SparseGPTResult(
        weight=Wt.T.to(dtype=weight.dtype, memory_format=torch.contiguous_format),
        mask=torch.logical_not(pruned_t.T).contiguous(),
        loss=float(loss),
        dampening_frac=used_frac,
    )
