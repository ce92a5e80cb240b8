"""Pruning-mask selection: the one place that decides which weights go.

Magnitude, Wanda and SparseGPT differ only in the *scores* they rank; the ranking
itself lives here so that counts, tie-breaking and "already zero" handling are the
same everywhere.

Conventions for every function in this module:
  * masks are ``torch.bool`` with ``True`` = keep, ``False`` = prune;
  * lower score = pruned first;
  * exact counts, and ties broken by position (the lower flat index is pruned
    first, as a stable sort would order them): deterministic, never over-pruning
    the way a ``score <= threshold`` rule does on ties;
  * ``forced_prune`` (bool, same shape as ``scores``) marks weights that must be
    pruned whatever their score (e.g. weights that are already zero when the
    existing sparsity pattern is preserved). They are counted first toward the
    budget; if they alone exceed it, exactly they are pruned and nothing more.
  * nothing here synchronises with the device (no ``.item()``), so the functions
    can be called inside SparseGPT's column loop on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK_STRUCTURE_HELP = "mask_structure must be '0:0' (unstructured) or 'N:M' with integers 0 < N < M such as '2:4'"


def parse_mask_structure(value: str) -> tuple[int, int]:
    """Parse llm-compressor's ``mask_structure`` string.

    ``"0:0"`` -> ``(0, 0)`` (unstructured); ``"N:M"`` with integers ``0 < N < M`` ->
    ``(N, M)``: N of every M consecutive weights along the input dimension are zero.
    Anything else raises ``ValueError`` naming the field and the allowed values.
    """
    parts = value.split(":") if isinstance(value, str) else []
    try:
        if len(parts) != 2:
            raise ValueError
        # int() accepts " 2" and "+2"; insist on plain digits so "2.0" or "-1" are rejected too.
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"{_MASK_STRUCTURE_HELP}; got {value!r}") from None
    if (n, m) == (0, 0) or 0 < n < m:
        return n, m
    raise ValueError(f"{_MASK_STRUCTURE_HELP}; got {value!r}")


def validate_mask_structure(mask_structure: tuple[int, int]) -> tuple[int, int]:
    """Check an already-parsed ``(N, M)`` pair; returns it as ints or raises ``ValueError``."""
    try:
        n, m = (int(v) for v in mask_structure)
    except (TypeError, ValueError):
        raise ValueError(f"{_MASK_STRUCTURE_HELP}; got {mask_structure!r}") from None
    if (n, m) == (0, 0) or 0 < n < m:
        return n, m
    raise ValueError(f"{_MASK_STRUCTURE_HELP}; got {mask_structure!r}")


def validate_sparsity(sparsity: float) -> None:
    """Raise ``ValueError`` naming ``sparsity`` unless it lies in [0, 1)."""
    try:
        ok = 0.0 <= float(sparsity) < 1.0  # False for NaN
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}")


def _check_forced(scores: Tensor, forced_prune: Tensor | None) -> None:
    if forced_prune is None:
        return
    if forced_prune.shape != scores.shape:
        raise ValueError(
            f"forced_prune must have the shape of scores {tuple(scores.shape)}; got {tuple(forced_prune.shape)}"
        )
    if forced_prune.dtype != torch.bool:
        raise ValueError(f"forced_prune must be a bool tensor; got {forced_prune.dtype}")


def _prune_lowest(scores: Tensor, k: int, forced_prune: Tensor | None) -> Tensor:
    """Keep mask over the last dim of ``scores`` [..., L]: prune the max(k, #forced) lowest per slice.

    Selection by the k-th smallest value plus a positional tie-break (the first ties by index
    go), which equals a stable sort's order; kthvalue measured 4x faster than sort on
    128x1024-element blocks on CPU. Forced positions get score -inf so they come first; a
    slice whose forced count exceeds k prunes exactly its forced positions. No host sync.
    """
    length = scores.shape[-1]
    if k <= 0 or length == 0:
        if forced_prune is None:
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        return ~forced_prune
    if not scores.is_floating_point():
        scores = scores.float()  # -inf below needs a float dtype
    if forced_prune is not None:
        scores = scores.masked_fill(forced_prune, float("-inf"))
    k = min(k, length)
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    need = k - below.sum(dim=-1, keepdim=True)
    prune = below | (tied & (tied.cumsum(dim=-1) <= need))
    if forced_prune is not None:
        over_budget = forced_prune.sum(dim=-1, keepdim=True) > k
        prune = torch.where(over_budget, forced_prune, prune)
    return ~prune


def unstructured_keep_mask(
    scores: Tensor, sparsity: float, *, per_row: bool = False, forced_prune: Tensor | None = None
) -> Tensor:
    """Unstructured keep mask pruning the lowest scores.

    Args:
        scores: any shape (2-D [rows, cols] when ``per_row``), any float dtype.
        sparsity: fraction in [0, 1); exactly ``int(sparsity * numel)`` entries are pruned
            (``int(sparsity * cols)`` per row when ``per_row``), plus any excess of forced ones.
        per_row: rank within each row (Wanda's comparison group) instead of the whole tensor.
        forced_prune: optional bool, same shape as ``scores``; always pruned, counted first.
    Returns:
        bool tensor shaped like ``scores``, True = keep.
    """
    validate_sparsity(sparsity)
    _check_forced(scores, forced_prune)
    if per_row:
        if scores.dim() != 2:
            raise ValueError(f"per_row scores must be 2-D [rows, cols]; got shape {tuple(scores.shape)}")
        k = int(sparsity * scores.shape[1])
        return _prune_lowest(scores, k, forced_prune)
    k = int(sparsity * scores.numel())
    flat_forced = None if forced_prune is None else forced_prune.reshape(-1)
    return _prune_lowest(scores.reshape(-1), k, flat_forced).reshape(scores.shape)


def nm_keep_mask(scores: Tensor, n: int, m: int, *, forced_prune: Tensor | None = None) -> Tensor:
    """N:M keep mask: in every group of ``m`` consecutive columns prune the ``n`` lowest.

    Args:
        scores: [rows, cols] with ``cols % m == 0``, any float dtype.
        n, m: integers with ``0 < n < m``.
        forced_prune: optional bool [rows, cols]; pruned first, so a group ends with
            max(n, forced in group) zeros: possibly more than n, never fewer.
    Returns:
        bool [rows, cols], True = keep.
    """
    n, m = validate_mask_structure((n, m))
    if n == 0:
        raise ValueError(f"{_MASK_STRUCTURE_HELP}; got {(n, m)!r} for an N:M mask")
    if scores.dim() != 2 or scores.shape[1] % m != 0:
        raise ValueError(
            f"N:M pruning with M={m} needs scores [rows, cols] with cols divisible by {m}; "
            f"got shape {tuple(scores.shape)}"
        )
    _check_forced(scores, forced_prune)
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    grouped_forced = None if forced_prune is None else forced_prune.reshape(rows, cols // m, m)
    return _prune_lowest(grouped, n, grouped_forced).reshape(rows, cols)


def keep_mask(
    scores: Tensor,
    sparsity: float,
    mask_structure: tuple[int, int],
    *,
    per_row: bool = False,
    forced_prune: Tensor | None = None,
) -> Tensor:
    """Dispatch: ``(0, 0)`` -> :func:`unstructured_keep_mask`, else :func:`nm_keep_mask` (``sparsity`` ignored)."""
    n, m = validate_mask_structure(mask_structure)
    if n == 0:
        return unstructured_keep_mask(scores, sparsity, per_row=per_row, forced_prune=forced_prune)
    return nm_keep_mask(scores, n, m, forced_prune=forced_prune)


def prune_by_scores(
    weight: Tensor,
    scores: Tensor,
    sparsity: float,
    mask_structure: tuple[int, int],
    *,
    per_row: bool = False,
    preserve_sparsity_mask: bool = False,
) -> tuple[Tensor, Tensor]:
    """Zero the lowest-scoring weights (no update of the others): the whole of magnitude and Wanda pruning.

    Args:
        weight: [out, in] float tensor; not modified.
        scores: [out, in], higher = more important.
        preserve_sparsity_mask: weights already exactly zero are always pruned and counted first.
    Returns:
        ``(pruned weight, keep mask)``: weight in ``weight``'s dtype and device; mask bool [out, in], True = kept.
    """
    mask_structure = validate_mask_structure(mask_structure)
    validate_sparsity(sparsity)
    forced = (weight == 0) if preserve_sparsity_mask else None
    keep = keep_mask(scores, sparsity, mask_structure, per_row=per_row, forced_prune=forced)
    return weight.detach().masked_fill(~keep, 0), keep
