"""Calibration statistics accumulated from a layer's inputs.

* :class:`HessianAccumulator` - SparseGPT/GPTQ's ``H = 2/n * sum x x^T``.
* :class:`InputNormAccumulator` - Wanda/OWL's per-input-column ``||x_j||^2``.
* :func:`inverse_hessian_factor` - the dampened inverse-Hessian Cholesky factor SparseGPT and GPTQ solve with.

Both only ever see activations ``x [..., columns]`` (the input of one linear layer),
keep fp32 state, and can be merged so calibration can later be split across workers.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_DAMPENING_RETRIES = 4
# A zero dampening cannot grow by multiplication; retries start here instead.
_FIRST_RETRY_FROM_ZERO = 1e-4


# Inputs at least this wide get their Hessian computed as an upper block-triangle of this many row blocks
# (below it the blocks would be too narrow for efficient GEMMs).
_TRIANGLE_MIN_COLUMNS = 512
_TRIANGLE_BLOCKS = 4


def _num_samples(x: Tensor) -> int:
    # llm-compressor counts dataset samples, not tokens: a 2-D input is one sample,
    # [batch, seq, columns] is `batch` samples. Matching it keeps our losses comparable.
    return int(x.shape[0]) if x.dim() >= 3 else 1


def _check_columns(x: Tensor, columns: int, owner: str) -> None:
    if x.dim() < 1 or x.shape[-1] != columns:
        raise ValueError(f"{owner}.add expects x [..., {columns}]; got shape {tuple(x.shape)}")


class HessianAccumulator:
    """fp32 ``H = 2/n * sum over all tokens of x x^T``, kept as an fp64 sum.

    ``n`` counts *samples* (sequences): ``x.shape[0]`` for ``x`` of rank >= 3, 1 for a
    2-D ``x`` - exactly llm-compressor's convention, so our reported losses compare
    with its.

    Each ``add`` computes its ``x^T x`` with fp32 GEMMs and adds it to an fp64 sum, so the
    result does not depend on how the batches were grouped: workers that each sum their own
    batches and merge (in any order) get the very bits of one pass over all of them, up to
    fp64 rounding, which the final fp32 result does not show (a data-parallel run gives the
    masks and quantized values of a single worker). It costs an fp64 copy of ``H`` while
    calibrating and one fp32 add per batch, small next to the GEMM (tokens x columns^2).

    Attributes:
        hessian: [columns, columns] fp32, symmetric (computed when read, then kept until the next add).
        num_samples: samples seen so far.
        num_tokens: rows of ``x`` (flattened to [tokens, columns]) seen so far.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        if columns < 1:
            raise ValueError(f"columns must be >= 1; got {columns}")
        self.columns = columns
        self._sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self._lower_stale = False  # only the upper block-triangle of _sum is current; see add()
        self._hessian: Tensor | None = None
        self.num_samples = 0
        self.num_tokens = 0

    @property
    def hessian(self) -> Tensor:
        """[columns, columns] fp32, symmetric."""
        if self._lower_stale:
            upper = torch.triu(self._sum)
            self._sum = upper + torch.triu(upper, 1).T
            self._lower_stale = False
        if self._hessian is None:
            scale = 2.0 / self.num_samples if self.num_samples else 0.0
            self._hessian = (self._sum * scale).to(torch.float32)
        return self._hessian

    def add(self, x: Tensor) -> None:
        """Fold in activations ``x [..., columns]`` of any float dtype (any device)."""
        _check_columns(x, self.columns, "HessianAccumulator")
        added = _num_samples(x)
        if added == 0 or x.numel() == 0:
            return
        tokens = x.reshape(-1, self.columns).to(device=self._sum.device, dtype=torch.float32)
        # H is symmetric, so for wide inputs only the upper block-triangle is computed (row block i against columns
        # i..end: a few wide GEMMs), and the lower half is mirrored when read: measured 1.35-1.5x faster at 1024
        # and 2816 columns on 2 CPU threads.
        step = self.columns // _TRIANGLE_BLOCKS if self.columns >= _TRIANGLE_MIN_COLUMNS else self.columns
        for start in range(0, self.columns, step):
            stop = min(start + step, self.columns)
            self._sum[start:stop, start:] += tokens[:, start:stop].T @ tokens[:, start:]
        self._lower_stale = self._lower_stale or step < self.columns
        self._hessian = None
        self.num_samples += added
        self.num_tokens += tokens.shape[0]

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another partial sum in place: the result equals one pass over both inputs."""
        if other.columns != self.columns:
            raise ValueError(f"cannot merge Hessians of {other.columns} and {self.columns} columns")
        if other.num_samples == 0:
            return
        if self._lower_stale != other._lower_stale:  # both whole before adding
            self.hessian, other.hessian  # noqa: B018 - mirrors the lower halves
        self._sum += other._sum.to(self._sum.device)
        self._hessian = None
        self.num_samples += other.num_samples
        self.num_tokens += other.num_tokens

    def nbytes(self) -> int:
        """Bytes of the state that travels when workers merge (the fp64 sum)."""
        return self._sum.numel() * self._sum.element_size()

    def to(self, device: torch.device | str) -> "HessianAccumulator":
        """Move the state to ``device`` (in place); returns self for chaining."""
        self._sum = self._sum.to(device)
        if self._hessian is not None:
            self._hessian = self._hessian.to(device)
        return self


class InputNormAccumulator:
    """Per-input-column sum of squares over all tokens (Wanda's and OWL's ``||x_j||^2``).

    Attributes:
        squared_norm: [columns] fp32, sum over tokens of ``x_j^2``.
        num_tokens: tokens seen so far (rows of ``x`` flattened to [tokens, columns]).
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        if columns < 1:
            raise ValueError(f"columns must be >= 1; got {columns}")
        self.columns = columns
        self.squared_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, x: Tensor) -> None:
        """Fold in activations ``x [..., columns]`` of any float dtype (any device)."""
        _check_columns(x, self.columns, "InputNormAccumulator")
        tokens = x.reshape(-1, self.columns).to(device=self.squared_norm.device, dtype=torch.float32)
        self.squared_norm += tokens.square().sum(dim=0)
        self.num_tokens += tokens.shape[0]

    def merge(self, other: "InputNormAccumulator") -> None:
        """Add another accumulator's sums in place (sums, so merging is exact)."""
        if other.columns != self.columns:
            raise ValueError(f"cannot merge input norms of {other.columns} and {self.columns} columns")
        self.squared_norm += other.squared_norm.to(self.squared_norm.device)
        self.num_tokens += other.num_tokens

    def to(self, device: torch.device | str) -> "InputNormAccumulator":
        """Move the state to ``device`` (in place); returns self for chaining."""
        self.squared_norm = self.squared_norm.to(device)
        return self


class HessianError(RuntimeError):
    """The Hessian could not be inverted even with the largest dampening tried."""


def _upper_cholesky_of_inverse(hessian: Tensor, dampening_frac: float) -> Tensor | None:
    """U with ``U^T U = (H + damp I)^-1``, U upper triangular; None if H is not positive definite.

    ``damp = dampening_frac * mean(diag H)``. Uses the ``_ex`` variants so failure is a
    flag we check once per attempt rather than an exception per call.
    """
    damped = hessian.clone()
    diag = damped.diagonal()
    diag += dampening_frac * diag.mean()
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    hinv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    # potrf flags NaN pivots, so a non-finite H already failed above; checking U's diagonal
    # catches overflow in the inverse at O(n) instead of a full isfinite pass (45 ms at n=2816).
    if info.item() != 0 or not bool(torch.isfinite(upper.diagonal()).all()):
        return None
    return upper


def inverse_hessian_factor(hessian: Tensor, dampening_frac: float) -> tuple[Tensor, float]:
    """Upper U [n, n] fp32 with ``U^T U = (H + damp I)^-1`` and the dampening_frac that worked: on failure the
    fraction grows tenfold (from 1e-4 if it was 0) up to four times; then HessianError. The caller, which knows
    the module, says when more dampening than asked was needed."""
    frac = dampening_frac
    for attempt in range(_MAX_DAMPENING_RETRIES + 1):
        upper = _upper_cholesky_of_inverse(hessian, frac)
        if upper is not None:
            return upper, frac
        if attempt == _MAX_DAMPENING_RETRIES:
            break
        frac = frac * 10 if frac > 0 else _FIRST_RETRY_FROM_ZERO
    raise HessianError(
        f"the Hessian is not positive definite even with dampening_frac={frac:g} "
        f"(started at {dampening_frac:g}, {_MAX_DAMPENING_RETRIES} retries); "
        "use more or more varied calibration samples, or a larger dampening_frac"
    )
