"""Magnitude pruning: drop the weights with the smallest ``|W|``, no calibration data."""

from __future__ import annotations

from torch import Tensor

from service.algorithms.masks import prune_by_scores


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
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in]; got {weight.dtype} {tuple(weight.shape)}")
    # Rank in fp32: fp16/bf16 magnitudes tie far more often, and ties then fall to position.
    scores = weight.detach().abs().float()
    return prune_by_scores(weight, scores, sparsity, mask_structure, preserve_sparsity_mask=preserve_sparsity_mask)
