"""Hadamard matrices and a fast orthonormal Walsh-Hadamard transform.

A Hadamard matrix H of order n has entries +-1 and ``H @ H.T == n * I``; ``H / sqrt(n)`` is orthogonal.
Rotation-based quantization (QuaRot, SpinQuant) multiplies activations by such a matrix online, so the
transform must be cheap: :func:`fwht` never forms the n x n matrix.

Supported orders are ``n = K * 2^k`` (k >= 0) where K is a *base order* built here from the theory:

* K = 1: Sylvester, ``H_{2^k}``;
* K = q + 1, q = 3 (mod 4) a prime power: Paley I (12, 20, 28 = 27 + 1 over GF(27), 60, 108, 140, ...);
* K = 2(q + 1), q = 1 (mod 4) a prime power: Paley II (36 from q = 17, 52 from q = 25 over GF(25), ...);
* K = 4m for m in {23, 29, 39, 43} (92, 116, 156, 172): Goethals-Seidel array over published Williamson first rows.

With these, every multiple of 4 up to 184 is supported.

A Hadamard order above 2 is a multiple of 4, so for n with odd part m > 1 the base is the smallest
constructible K = m * 2^i (i >= 2) dividing n; usually K = 4m (e.g. 40 = 20 * 2, 11008 = 172 * 64). The
smallest base gives the cheapest transform. :func:`hadamard_sizes_note` lists the bases up to 256.

Kronecker ordering (used by both :func:`hadamard_matrix` and :func:`fwht`)::

    H_n = H_K (x) H_{2^k},   H_n[a * 2^k + b, c * 2^k + d] = H_K[a, c] * H_{2^k}[b, d]

so the base index is the slow (outer) one. ``H_{2^k}`` is Sylvester's, ``H[i, j] = (-1)^popcount(i & j)``,
which is symmetric; ``H_K`` for K > 2 is in general not, so ``H_n`` is not symmetric either.

Sign convention (one convention everywhere)::

    random_hadamard_matrix(n, seed) = H_n @ diag(s) / sqrt(n),        s = random_signs(n, seed)
    fwht(x, signs=s)                = x @ random_hadamard_matrix(n, seed).T = ((x * s) @ H_n.T) / sqrt(n)
    fwht(x, signs=s, transpose=True) = x @ random_hadamard_matrix(n, seed)  = ((x @ H_n) / sqrt(n)) * s

and the two are inverses of each other: ``fwht(fwht(x, signs=s), signs=s, transpose=True) == x``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "fwht",
    "hadamard_matrix",
    "hadamard_sizes_note",
    "is_hadamard_order",
    "random_hadamard_matrix",
    "random_signs",
]


# --------------------------------------------------------------------------------------------------------------------
# Constructions (exact, as int8 +-1 matrices)
# --------------------------------------------------------------------------------------------------------------------


def _sylvester(n: int) -> Tensor:
    """Sylvester's H_n for n a power of two: ``H[i, j] = (-1)^popcount(i & j)``; int8 [n, n], symmetric."""
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ---- finite fields GF(q), q = p^e, just enough for the quadratic character ----------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e >= 1; None when q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials as coefficient lists, lowest degree first, f monic."""
    a = list(a)
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top]
        if c:
            shift = top - (len(f) - 1)
            for i, fc in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fc) % p
    return (a + [0] * len(f))[: len(f) - 1]


def _monic_polys(p: int, degree: int):
    for code in range(p**degree):
        yield [(code // p**i) % p for i in range(degree)] + [1]


def _irreducible_poly(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree e over GF(p) (no monic factor of degree <= e / 2)."""
    for f in _monic_polys(p, e):
        if all(any(_poly_mod(f, g, p)) for d in range(1, e // 2 + 1) for g in _monic_polys(p, d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix of GF(q): int8 [q, q], ``Q[i, j] = chi(x_i - x_j)`` with chi the quadratic character
    (0 at 0, +1 on non-zero squares, -1 otherwise). Element i of GF(p^e) is the polynomial whose
    coefficients are the base-p digits of i, modulo a fixed irreducible polynomial."""
    p, e = _prime_power(q)
    f = _irreducible_poly(p, e) if e > 1 else None
    digits = torch.tensor([[(i // p**t) % p for t in range(e)] for i in range(q)])
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[0] = 0
    for a in digits.tolist():
        square = [0] * (2 * e - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                square[i + j] += ai * aj
        sq = _poly_mod([c % p for c in square], f, p) if e > 1 else [sum(square) % p]
        if any(sq):
            chi[sum(c * p**t for t, c in enumerate(sq))] = 1
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    index = (diff * torch.tensor([p**t for t in range(e)])).sum(-1)
    return chi[index]


# ---- base orders ----------------------------------------------------------------------------------------------------


def _paley_i(q: int) -> Tensor:
    """Paley I, q = 3 (mod 4) a prime power: order q + 1, ``H = I + [[0, 1^T], [-1, Q]]`` (Q antisymmetric)."""
    h = torch.ones(q + 1, q + 1, dtype=torch.int8)
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + torch.eye(q, dtype=torch.int8)
    return h


def _paley_ii(q: int) -> Tensor:
    """Paley II, q = 1 (mod 4) a prime power: order 2(q + 1). With the symmetric conference matrix
    ``S = [[0, 1^T], [1, Q]]``, ``H = S (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``."""
    s = torch.ones(q + 1, q + 1, dtype=torch.int8)
    s[0, 0] = 0
    s[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(s, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int8), zero)


# First rows of Williamson matrices (symmetric +-1 circulants A, B, C, D of order m with
# A A^T + B B^T + C C^T + D D^T = 4m I), for orders 4m that no Paley construction reaches; the code expands them
# through the Goethals-Seidel array. Sources, as tabulated in SageMath's ``williamson_type_quadruples_smallcases``:
# m = 23, 29, 43: M. Hall Jr., Combinatorial Theory, 2nd ed., Wiley (table of Williamson matrices; 92 = 4 * 23 is
# Baumert-Golomb-Hall 1962); m = 39: S. London, "Constructing new Turyn type sequences, T-sequences and Hadamard
# matrices", PhD thesis, University of Illinois at Chicago (2013). tests/algorithms/test_hadamard.py checks that their
# periodic autocorrelations sum to 4m at shift 0 and to 0 elsewhere, and that every resulting matrix is Hadamard.
_WILLIAMSON_FIRST_ROWS = {
    23: (
        "++---+---+-++-+---+---+",
        "+-++-++--++++++--++-++-",
        "+++---++-+-++-+-++---++",
        "+++-+++-+------+-+++-++",
    ),
    29: (
        "+++---++--+-+----+-+--++---++",
        "+-+---++--+-++++++-+--++---+-",
        "++++-++-+---++++++---+-++-+++",
        "++--+--+-+++-++++-+++-+--+--+",
    ),
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}


def _circulant(first_row: Tensor) -> Tensor:
    """Circulant matrix with ``C[i, j] = first_row[(j - i) mod m]``."""
    m = first_row.shape[0]
    idx = (torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m
    return first_row[idx]


def _goethals_seidel(rows: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Goethals-Seidel array: order 4m from four +-1 circulants whose periodic autocorrelations sum to
    zero off the origin (any such quadruple works, Williamson or not). R is the back-diagonal
    permutation; circulants commute and ``X R`` is symmetric, which makes the blocks orthogonal."""
    a, b, c, d = (_circulant(r) for r in rows)
    br, cr, dr = b.flip(1), c.flip(1), d.flip(1)  # X R reverses the columns of X
    btr, ctr, dtr = b.T.flip(1), c.T.flip(1), d.T.flip(1)
    return torch.cat(
        [
            torch.cat([a, br, cr, dr], 1),
            torch.cat([-br, a, dtr, -ctr], 1),
            torch.cat([-cr, -dtr, a, btr], 1),
            torch.cat([-dr, ctr, -btr, a], 1),
        ],
        0,
    )


def _williamson_rows(m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(
        torch.tensor([1 if ch == "+" else -1 for ch in row], dtype=torch.int8) for row in _WILLIAMSON_FIRST_ROWS[m]
    )


def _construction(base: int) -> str | None:
    """Name of the construction used for base order K (K > 1, K % 4 == 0), or None if there is none."""
    if _prime_power(base - 1) is not None:  # base - 1 = 3 (mod 4) automatically
        return "paley1"
    if _prime_power(base // 2 - 1) is not None and (base // 2 - 1) % 4 == 1:
        return "paley2"
    if base % 8 == 4 and base // 4 in _WILLIAMSON_FIRST_ROWS:
        return "williamson"
    return None


def _base_matrix(base: int) -> Tensor:
    """H_K for a base order K: int8 [K, K]."""
    kind = "sylvester" if base == 1 else _construction(base)
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.int8)
    if kind == "paley1":
        return _paley_i(base - 1)
    if kind == "paley2":
        return _paley_ii(base // 2 - 1)
    if kind == "williamson":
        return _goethals_seidel(_williamson_rows(base // 4))
    raise ValueError(f"no construction for base order {base}")


def _odd_part(n: int) -> tuple[int, int]:
    """(m, k) with n = m * 2^k and m odd."""
    k = (n & -n).bit_length() - 1
    return n >> k, k


@functools.lru_cache(maxsize=4096)
def _find_base(n: int) -> tuple[int, int] | None:
    """(K, 2^k) with n = K * 2^k and K the smallest constructible base order, or None.

    A Hadamard order above 2 is a multiple of 4, so with m the odd part of n the candidates are K = m * 2^i,
    i >= 2; usually K = 4m works (the smallest base makes the cheapest transform).
    """
    m, k = _odd_part(n)
    if m == 1:
        return 1, n
    for i in range(2, k + 1):
        if _construction(m << i) is not None:
            return m << i, 1 << (k - i)
    return None


def _split_order(n: int) -> tuple[int, int]:
    """:func:`_find_base`, raising ValueError naming n and the supported orders when there is no base."""
    found = _find_base(n) if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
    if found is None:
        raise ValueError(f"no Hadamard matrix of order {n!r} is available; {hadamard_sizes_note()}")
    return found


_NOTE_BASES_UP_TO = 256


@functools.lru_cache(maxsize=1)
def _small_bases() -> tuple[int, ...]:
    return tuple(b for b in range(12, _NOTE_BASES_UP_TO + 1, 4) if _find_base(b) == (b, 1))


def hadamard_sizes_note() -> str:
    """Human-readable description of the supported orders (used in error messages)."""
    bases = ", ".join(str(b) for b in _small_bases())
    return (
        "supported orders are K * 2^k (k >= 0) with K = 1 (powers of two), K = q + 1 for a prime power "
        "q = 3 (mod 4) (Paley I), K = 2(q + 1) for a prime power q = 1 (mod 4) (Paley II), or "
        f"K = 4m for m in {{{', '.join(map(str, sorted(_WILLIAMSON_FIRST_ROWS)))}}} (Williamson); "
        f"the bases K <= {_NOTE_BASES_UP_TO} are 1, {bases}"
    )


def is_hadamard_order(n: int) -> bool:
    """True when :func:`hadamard_matrix` (and :func:`fwht`) support order n."""
    try:
        _split_order(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=8)  # an order-11008 matrix is 121 MB even as int8
def _hadamard_int8(n: int) -> Tensor:
    """Cached int8 [n, n] Hadamard matrix H_K (x) H_{2^k}. Callers must not modify it."""
    base, power = _split_order(n)
    return torch.kron(_base_matrix(base), _sylvester(power))


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Hadamard matrix of order n: [n, n] in ``dtype`` on ``device``, entries +-1, ``H @ H.T == n * I``.

    Ordering ``H_n = H_K (x) H_{2^k}`` (see the module docstring). Raises ValueError naming n and the supported
    orders when n is not supported.
    """
    return _hadamard_int8(n).to(device=device, dtype=dtype, copy=True)  # never hand out the cached tensor


def random_signs(n: int, seed: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Deterministic +-1 vector [n] drawn from ``torch.Generator().manual_seed(seed)`` (on the CPU, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen)
    return (2 * bits - 1).to(device=device, dtype=dtype)


def random_hadamard_matrix(n: int, seed: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Orthonormal randomized Hadamard matrix ``H_n @ diag(random_signs(n, seed)) / sqrt(n)``: [n, n].

    Deterministic per (n, seed). ``x @ random_hadamard_matrix(n, seed).T == fwht(x, signs=random_signs(n, seed))``.
    """
    h = _hadamard_int8(n).to(torch.float64) * random_signs(n, seed) / math.sqrt(n)
    return h.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# Fast transform
# --------------------------------------------------------------------------------------------------------------------

# How the transform is computed, and why (bench/fwht_speed.py, x [2048, 4096] float32, 2 threads, on a shared
# 2-core machine, so figures are medians of interleaved rounds and noisy):
# * The 2^k factor is a Kronecker chain of small scaled Sylvester matrices, each one BLAS matmul over one axis of
#   x viewed as [rows, d1, d2, ...] (the base H_K is the outermost factor): n * sum(d_i) multiply-adds per row
#   instead of n^2 for a dense rotation. A plain radix-2 add/sub butterfly does fewer flops but makes log2(n)
#   passes over memory with a fresh tensor each, and was slower than even the dense matmul (0.8x dense). With two
#   64-chunks the transform is memory-bound: caps of 16..256 were within noise of each other, 8 (4 passes) was
#   clearly slower; 64 keeps 4096 and 8192 at two/three passes.
# * Rows are processed in blocks of _BLOCK_ELEMENTS (16 MB of float32): temporaries below glibc's 32 MB mmap
#   ceiling are reused by the allocator instead of being page-faulted afresh for every op. 2^22 had the best
#   median (9.0x dense); one block was ~1.2x slower, and small cache-sized blocks (2^16..2^20) were 2-4x slower
#   under load (many short parallel ops wait on each other's threads) although fastest when the machine was
#   quiet. Off the CPU, one block.
_MAX_CHUNK_LOG2 = 6
_BLOCK_ELEMENTS = 1 << 22


def _chunk_sizes(power: int) -> list[int]:
    """Split 2^k into as few factors of at most 2^_MAX_CHUNK_LOG2 as possible, sizes as even as possible."""
    k = power.bit_length() - 1
    if k == 0:
        return []
    parts = -(-k // _MAX_CHUNK_LOG2)
    logs = [k // parts + (1 if i < k % parts else 0) for i in range(parts)]
    return [1 << lg for lg in logs]


@functools.lru_cache(maxsize=64)
def _factor_matrix(order: int, is_base: bool, transpose: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The matrix M with ``y_axis = M @ x_axis`` for one Kronecker factor, scaled by 1/sqrt(order); [order, order]."""
    h = (_base_matrix(order) if is_base else _sylvester(order)).to(torch.float64) / math.sqrt(order)
    if transpose:  # y = H.T x along the axis, i.e. x @ H in the row-vector convention
        h = h.T
    return h.to(device=device, dtype=dtype).contiguous()


def _transform(x: Tensor, signs: Tensor | None, transpose: bool) -> Tensor:
    """The forward computation of :func:`fwht` on x [rows, n] (no autograd); returns a new contiguous [rows, n]."""
    rows, n = x.shape
    base, power = _split_order(n)
    factors = ([(base, True)] if base > 1 else []) + [(d, False) for d in _chunk_sizes(power)]
    mats = [_factor_matrix(d, is_base, transpose, x.dtype, x.device) for d, is_base in factors]
    dims = [d for d, _ in factors]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    step = max(1, _BLOCK_ELEMENTS // n) if x.device.type == "cpu" else max(rows, 1)
    for start in range(0, rows, step):
        cur = x[start : start + step]
        b = cur.shape[0]
        dst = out[start : start + b]
        if signs is not None and not transpose:
            cur = cur * signs
        if not factors:  # n == 1
            dst.copy_(cur)
        # Apply factors from the innermost (last) axis outwards. Axis j of the [b, d1, ..., dm] view is transformed
        # by viewing the block as [b * prod(d<j), d_j, prod(d>j)] and multiplying by M_j from the left; the last
        # axis is a single GEMM with M.T on the right. The outermost factor writes straight into the output.
        for j in range(len(factors) - 1, -1, -1):
            d, post = dims[j], math.prod(dims[j + 1 :])
            target = dst if j == 0 else None
            if post == 1:
                res = torch.matmul(
                    cur.reshape(b * n // d, d), mats[j].T, out=None if target is None else target.view(b * n // d, d)
                )
            else:
                shape = (b * n // (d * post), d, post)
                res = torch.matmul(mats[j], cur.reshape(shape), out=None if target is None else target.view(shape))
            cur = res
        if signs is not None and transpose:
            dst.mul_(signs)
    return out


class _HadamardTransform(torch.autograd.Function):
    """Linear map, so the backward pass is the transposed transform of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, signs: Tensor | None, transpose: bool) -> Tensor:
        ctx.transpose = transpose
        ctx.has_signs = signs is not None
        if signs is not None:
            ctx.save_for_backward(signs)
        return _transform(x, signs, transpose)

    @staticmethod
    def backward(ctx, grad: Tensor):
        signs = ctx.saved_tensors[0] if ctx.has_signs else None
        return _HadamardTransform.apply(grad, signs, not ctx.transpose), None, None


def fwht(x: Tensor, *, signs: Tensor | None = None, transpose: bool = False) -> Tensor:
    """Orthonormal (randomized) Hadamard transform along the last dim of x.

    Args:
        x: [..., n] float32/float64/bfloat16 (any device); n a supported order (:func:`is_hadamard_order`).
        signs: optional [n] +-1 vector (e.g. :func:`random_signs`), the diag(s) of the randomized transform.
            Treated as a constant: no gradient flows to it.
        transpose: apply the transposed (= inverse) matrix.

    Returns:
        A new [..., n] tensor, same dtype/device as x:
        ``x @ (H_n diag(s) / sqrt(n)).T`` when transpose is False, ``x @ (H_n diag(s) / sqrt(n))`` when True
        (s = 1 without signs). Differentiable with respect to x. Costs n * (K + sum of chunk sizes)
        multiply-adds per row (about 128 n for n = 4096), never an n x n matrix.
    """
    n = x.shape[-1]
    _split_order(n)  # the ValueError naming n, before any other check
    if signs is not None:
        if signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        signs = signs.to(device=x.device, dtype=x.dtype)
    y = _HadamardTransform.apply(x.reshape(-1, n), signs, transpose)
    return y.reshape(x.shape)
