"""Magnitude pruning: drop the weights with the smallest ``|W|``, no calibration data."""

from __future__ import annotations

from torch import Tensor

from service.masks import keep_mask, validate_mask_structure, validate_sparsity


def magnitude_prune(
    weight: Tensor,
    sparsity: float,
    *,
    mask_structure: tuple[int, int] = (0, 0),
    preserve_sparsity_mask: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prune by ``|W|`` over the whole matrix (unstructured) or per group of M inputs (N:M).

    Args:
        weight: [out, in] float tensor, any dtype and device; not modified.
        sparsity: fraction in [0, 1); exactly ``int(sparsity * numel)`` pruned (ignored for N:M).
        mask_structure: ``(0, 0)`` or ``(N, M)`` (N of every M consecutive inputs pruned).
        preserve_sparsity_mask: weights already exactly zero are always pruned and counted first.
    Returns:
        ``(pruned weight, keep mask)``: the weight has ``weight``'s dtype and device; the mask is
        bool [out, in], True = kept.
    """
    mask_structure = validate_mask_structure(mask_structure)
    validate_sparsity(sparsity)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in]; got {weight.dtype} {tuple(weight.shape)}")
    forced = (weight == 0) if preserve_sparsity_mask else None
    # Rank in fp32: fp16/bf16 magnitudes tie far more often, and ties then fall to position.
    scores = weight.detach().abs().float()
    keep = keep_mask(scores, sparsity, mask_structure, forced_prune=forced)
    return weight.detach().masked_fill(~keep, 0), keep
