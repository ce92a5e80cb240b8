"""OWL (Yin et al., 2023): Outlier Weighed Layerwise sparsity.

Blocks whose Wanda scores hold more outliers are given lower sparsity, the rest higher,
keeping the mean at the target. The formulas follow the paper's code and llm-compressor's
``_infer_owl_layer_sparsity`` (which uses percent; the min-max normalisation below makes
percent and fraction give identical sparsities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from service.algorithms.wanda import wanda_scores


def outlier_ratio(weights: Sequence[Tensor], input_squared_norms: Sequence[Tensor], owl_m: float) -> float:
    """Fraction of one block's Wanda scores above ``owl_m`` times their mean.

    Args:
        weights: the block's target modules, each [out_k, in_k].
        input_squared_norms: per module [in_k], sum over tokens of ``x_j^2``.
        owl_m: outlier threshold multiplier (the paper's M, typically 3-10).
    Returns:
        fraction in [0, 1] over all the modules' scores taken together (as if concatenated).
    """
    if len(weights) != len(input_squared_norms):
        raise ValueError(
            f"weights and input_squared_norms must pair up; got {len(weights)} and {len(input_squared_norms)}"
        )
    if not weights:
        raise ValueError("outlier_ratio needs at least one weight")
    if not owl_m > 0:
        raise ValueError(f"owl_m must be > 0; got {owl_m!r}")
    # Two passes instead of concatenating: the block's scores can be hundreds of millions of values.
    scores = [wanda_scores(w, s) for w, s in zip(weights, input_squared_norms)]
    total = sum(sc.numel() for sc in scores)
    mean = sum(sc.sum(dtype=torch.float64).item() for sc in scores) / total
    threshold = owl_m * mean
    outliers = sum(int((sc > threshold).sum().item()) for sc in scores)
    return outliers / total


def owl_sparsities(ratios: Sequence[float], target: float, owl_lmbda: float) -> list[float]:
    """Per-block sparsities from outlier ratios (OWL's rule).

    ``r' = (r - min) / (max - min) * 2 * lmbda``; ``density_i = r'_i - mean(r') + (1 - target)``;
    ``sparsity_i = 1 - density_i``. The results lie in ``[target - lmbda, target + lmbda]``,
    average to ``target``, and more outliers give LOWER sparsity. Equal ratios give ``target``
    everywhere.

    Raises:
        ValueError naming the field when ``target`` is outside [0, 1), ``owl_lmbda`` is negative,
        or a resulting sparsity falls outside [0, 1).
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"sparsity target must be in [0, 1); got {target!r}")
    if not owl_lmbda >= 0.0:
        raise ValueError(f"owl_lmbda must be >= 0; got {owl_lmbda!r}")
    if not ratios:
        return []
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [float(target)] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * owl_lmbda for r in ratios]
    mean = sum(scaled) / len(scaled)
    sparsities = [1.0 - (s - mean + (1.0 - target)) for s in scaled]
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(
            f"owl_lmbda={owl_lmbda!r} with sparsity target {target!r} gives layer sparsities outside [0, 1) "
            f"(min {min(sparsities):.4f}, max {max(sparsities):.4f}); use a smaller owl_lmbda"
        )
    return sparsities
