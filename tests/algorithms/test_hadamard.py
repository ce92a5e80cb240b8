import math

import pytest
import torch

from service.algorithms import hadamard
from service.algorithms.hadamard import (
    fwht,
    hadamard_matrix,
    hadamard_sizes_note,
    is_hadamard_order,
    random_hadamard_matrix,
    random_signs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The orders QuaRot ships hard-coded matrices for, as base K of K * 2^k; 172 = 4 * 43 is stories260K's
# intermediate size.
QUAROT_BASES = [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]
BOUND = 172 * 4


def _gram_is_n_identity(h: torch.Tensor) -> bool:
    """Exact check of H H^T == n I: every partial sum of a float64 product of +-1 integer matrices is an
    integer of magnitude <= n < 2^53, so the float64 matmul is exact (no tolerance)."""
    n = h.shape[0]
    h64 = h.to(torch.float64)
    return torch.equal(h64 @ h64.T, n * torch.eye(n, dtype=torch.float64))


def _dense_reference(x, n, signs=None, transpose=False):
    """x @ (H diag(s) / sqrt n).T (or without .T), dense, float64."""
    h = hadamard_matrix(n).clone()
    if signs is not None:
        h = h * signs.to(torch.float64)
    h = h / math.sqrt(n)
    return x.to(torch.float64) @ (h if transpose else h.T)


def _slow_paley_i(q):
    """Paley I straight from the definition for a prime q = 3 (mod 4), with Python integers."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [[0 if i == j else (1 if (i - j) % q in squares else -1) for j in range(q)] for i in range(q)]
    rows = [[1] * (q + 1)] + [[-1] + [chi[i][j] + (i == j) for j in range(q)] for i in range(q)]
    return torch.tensor(rows, dtype=torch.int8)


def test_every_supported_order_up_to_bound_is_hadamard():
    orders = [n for n in range(1, BOUND + 1) if is_hadamard_order(n)]
    # Sanity on the set itself: all required sizes present, and only 1, 2 and multiples of 4.
    for base in QUAROT_BASES:
        assert all(is_hadamard_order(base << k) for k in range(4))
    assert all(n in (1, 2) or n % 4 == 0 for n in orders)
    assert len(orders) > 120
    assert all(is_hadamard_order(n) for n in range(4, 185, 4))
    for n in orders:
        h = hadamard_matrix(n, dtype=torch.int64)
        assert h.shape == (n, n)
        assert bool(((h == 1) | (h == -1)).all()), n
        assert _gram_is_n_identity(h), n


def test_constructions_separately():
    # Every construction path, at orders where it is the one used.
    assert hadamard._construction(12) == "paley1"  # q = 11
    assert hadamard._construction(28) == "paley1"  # q = 27 = 3^3, needs GF(27)
    assert hadamard._construction(36) == "paley2"  # q = 17
    assert hadamard._construction(52) == "paley2"  # q = 25 = 5^2, needs GF(25)
    assert hadamard._construction(156) == "williamson"
    assert hadamard._construction(172) == "williamson"
    assert hadamard._construction(92) == hadamard._construction(116) == "williamson"
    assert hadamard._construction(244) == "paley1"  # q = 243 = 3^5
    for base in (28, 36, 52, 92, 116, 156, 172, 244):
        assert _gram_is_n_identity(hadamard._base_matrix(base)), base


def test_paley_i_matches_definition_for_prime_q():
    for q in (11, 19, 59):
        assert torch.equal(hadamard._paley_i(q), _slow_paley_i(q))


def test_williamson_rows_have_zero_periodic_autocorrelation_sum():
    for m in hadamard._WILLIAMSON_FIRST_ROWS:
        rows = hadamard._williamson_rows(m)
        total = [0] * m
        for r in rows:
            r = r.tolist()
            assert len(r) == m
            for s in range(m):
                total[s] += sum(r[i] * r[(i + s) % m] for i in range(m))
        assert total == [4 * m] + [0] * (m - 1)


def test_gf_prime_power_fields():
    # The quadratic character of GF(q) takes each of +-1 on (q - 1) / 2 elements, and chi(-1) = (-1)^((q-1)/2).
    for q in (9, 25, 27, 49, 125, 243):
        jac = hadamard._jacobsthal(q)
        assert int((jac[0] == 1).sum()) == (q - 1) // 2 == int((jac[0] == -1).sum())
        expected = jac if q % 4 == 1 else -jac
        assert torch.equal(jac.T, expected), q
    assert hadamard._prime_power(27) == (3, 3)
    assert hadamard._prime_power(1) is None and hadamard._prime_power(12) is None


def test_kronecker_ordering():
    n = 172 * 4
    h = hadamard_matrix(n, dtype=torch.int64)
    base = hadamard_matrix(172, dtype=torch.int64)
    sylvester = hadamard_matrix(4, dtype=torch.int64)
    assert torch.equal(h, torch.kron(base, sylvester))
    assert torch.equal(sylvester, sylvester.T)


def test_unsupported_order_names_order_and_supported_list():
    for n in (3, 6, 10, 188, 236, 0, -8):
        assert not is_hadamard_order(n)
        with pytest.raises(ValueError) as err:
            hadamard_matrix(n)
        assert str(n) in str(err.value) and "172" in str(err.value) and "Paley" in str(err.value)
        if n > 0:
            with pytest.raises(ValueError, match=f"order {n} "):
                fwht(torch.zeros(2, n))
    assert "12, 20, 28, 36" in hadamard_sizes_note()


def test_matrices_are_cached_but_returned_fresh():
    for dtype in (torch.float64, torch.int8):
        a = hadamard_matrix(172, dtype=dtype)
        a.zero_()
        assert _gram_is_n_identity(hadamard_matrix(172))
    assert hadamard_matrix(64, dtype=torch.float32).dtype == torch.float32


def test_random_hadamard_is_deterministic_orthonormal_and_matches_definition():
    for n in (64, 172, 344):
        r = random_hadamard_matrix(n, seed=3)
        assert torch.equal(r, random_hadamard_matrix(n, seed=3))
        assert not torch.equal(r, random_hadamard_matrix(n, seed=4))
        torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        s = random_signs(n, 3)
        assert set(s.tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(r, hadamard_matrix(n) @ torch.diag(s) / math.sqrt(n), atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 4096, 12, 24, 40, 156, 172, 344, 172 * 8, 28 * 32, 52 * 2])
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_fwht_matches_dense_float64(n, with_signs, transpose):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=gen, dtype=torch.float64)
    s = random_signs(n, 7) if with_signs else None
    y = fwht(x, signs=s, transpose=transpose)
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, _dense_reference(x, n, s, transpose), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [256, 2048, 172 * 32, 20 * 128])
def test_fwht_multi_chunk_and_multi_block(monkeypatch, n):
    """Small chunk cap and block size force 3-5 Kronecker factors and several row blocks, the last one partial."""
    monkeypatch.setattr(hadamard, "_MAX_CHUNK_LOG2", 2)
    monkeypatch.setattr(hadamard, "_BLOCK_ELEMENTS", 3 * n)
    assert len(hadamard._chunk_sizes(hadamard._split_order(n)[1])) >= 3
    x = torch.randn(2, 5, n, dtype=torch.float64)
    s = random_signs(n, 5)
    for transpose in (False, True):
        expected = _dense_reference(x, n, s, transpose)
        torch.testing.assert_close(fwht(x, signs=s, transpose=transpose), expected, atol=1e-10, rtol=0)


def test_chunk_sizes():
    assert hadamard._chunk_sizes(1) == []
    assert hadamard._chunk_sizes(64) == [64]
    assert hadamard._chunk_sizes(4096) == [64, 64]
    assert hadamard._chunk_sizes(8192) == [32, 16, 16]
    for k in range(20):
        sizes = hadamard._chunk_sizes(1 << k)
        assert math.prod(sizes) == 1 << k and all(d <= 1 << hadamard._MAX_CHUNK_LOG2 for d in sizes)


def test_fwht_equals_random_hadamard_convention_and_inverts():
    for n in (256, 172, 20 * 8):
        s = random_signs(n, 11)
        r = random_hadamard_matrix(n, 11)
        x = torch.randn(5, n, dtype=torch.float64)
        torch.testing.assert_close(fwht(x, signs=s), x @ r.T, atol=1e-10, rtol=0)
        torch.testing.assert_close(fwht(x, signs=s, transpose=True), x @ r, atol=1e-10, rtol=0)
        torch.testing.assert_close(fwht(fwht(x, signs=s), signs=s, transpose=True), x, atol=1e-10, rtol=0)
        torch.testing.assert_close(fwht(fwht(x, transpose=True)), x, atol=1e-10, rtol=0)
        # Orthonormal: norms are preserved.
        torch.testing.assert_close(fwht(x, signs=s).norm(dim=-1), x.norm(dim=-1), atol=1e-10, rtol=0)


def test_fwht_batch_shapes_and_non_contiguous_input():
    n = 172
    x = torch.randn(n, 4, 3, dtype=torch.float64).permute(2, 1, 0)  # [3, 4, n], non-contiguous
    torch.testing.assert_close(fwht(x), _dense_reference(x, n), atol=1e-10, rtol=0)
    assert fwht(torch.randn(n, dtype=torch.float64)).shape == (n,)
    assert fwht(torch.randn(0, 64)).shape == (0, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_fwht_low_precision(device, dtype, tol):
    for n in (4096, 172 * 2):
        x = torch.randn(4, n, dtype=torch.float64)
        s = random_signs(n, 1)
        y = fwht(x.to(device=device, dtype=dtype), signs=s.to(device))
        assert y.dtype == dtype and y.device.type == device
        ref = _dense_reference(x, n, s)
        err = (y.double().cpu() - ref).abs().max().item()
        assert err < tol * ref.abs().max().item(), (n, dtype, err)


def test_fwht_autograd():
    n = 24
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    s = random_signs(n, 2)
    torch.autograd.gradcheck(lambda t: fwht(t, signs=s), (x,))
    torch.autograd.gradcheck(lambda t: fwht(t, signs=s, transpose=True), (x,))
    torch.autograd.gradgradcheck(lambda t: fwht(t, signs=s), (x,))
    # The gradient of sum(w * fwht(x)) is fwht^T(w).
    w = torch.randn(2, n, dtype=torch.float64)
    (fwht(x, signs=s) * w).sum().backward()
    torch.testing.assert_close(x.grad, fwht(w, signs=s, transpose=True), atol=1e-12, rtol=0)


def test_fwht_rejects_bad_signs():
    with pytest.raises(ValueError, match="signs"):
        fwht(torch.zeros(2, 8), signs=torch.ones(4))
