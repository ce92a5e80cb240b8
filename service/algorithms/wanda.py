"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||x_j||`` within each output row."""

from __future__ import annotations

import torch
from torch import Tensor

from service.algorithms.masks import prune_by_scores


def wanda_scores(weight: Tensor, input_squared_norm: Tensor) -> Tensor:
    """Wanda's saliency ``|W_ij| * sqrt(sum_tokens x_j^2)``.

    Args:
        weight: [out, in] any float dtype; input_squared_norm: [in] (``InputNormAccumulator.squared_norm``).
    Returns:
        fp32 [out, in] on ``weight``'s device.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in]; got shape {tuple(weight.shape)}")
    if tuple(input_squared_norm.shape) != (weight.shape[1],):
        raise ValueError(
            f"input_squared_norm must be [{weight.shape[1]}] for weight {tuple(weight.shape)}; "
            f"got {tuple(input_squared_norm.shape)}"
        )
    norm = input_squared_norm.detach().to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().abs().float() * norm.unsqueeze(0)


def wanda_prune(
    weight: Tensor,
    input_squared_norm: Tensor,
    sparsity: float,
    *,
    mask_structure: tuple[int, int] = (0, 0),
    preserve_sparsity_mask: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prune with Wanda scores: per output row (unstructured) or per group of M inputs (N:M).

    Args:
        weight: [out, in] float tensor, any dtype and device; not modified.
        input_squared_norm: [in] fp32 per-input sum over tokens of ``x_j^2``.
        sparsity: fraction in [0, 1); exactly ``int(sparsity * in)`` pruned in every row (ignored for N:M).
        mask_structure: ``(0, 0)`` or ``(N, M)``.
        preserve_sparsity_mask: weights already exactly zero are always pruned and counted first.
    Returns:
        ``(pruned weight, keep mask)``: weight in ``weight``'s dtype; mask bool [out, in], True = kept.
    """
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor; got {weight.dtype}")
    # The paper compares weights within one output row: pruning evenly across outputs matters for LLMs.
    return prune_by_scores(weight, wanda_scores(weight, input_squared_norm), sparsity, mask_structure, per_row=True,
                           preserve_sparsity_mask=preserve_sparsity_mask)
