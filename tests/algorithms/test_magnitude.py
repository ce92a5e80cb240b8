"""service/algorithms/magnitude.py: magnitude pruning, unstructured and N:M, against direct selections."""

import pytest
import torch

from service.algorithms.magnitude import magnitude_prune

W = torch.tensor([[1.0, -4.0, 2.0, -3.0], [5.0, 6.0, -7.0, 8.0]])


def test_magnitude_unstructured_is_per_matrix():
    pruned, keep = magnitude_prune(W, 0.5)
    # the 4 smallest |w| in the whole matrix are all in row 0
    assert pruned.tolist() == [[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, -7.0, 8.0]]
    assert keep.tolist() == [[False] * 4, [True] * 4]


def test_magnitude_nm():
    pruned, keep = magnitude_prune(W, 0.0, mask_structure=(2, 4))  # sparsity ignored for N:M
    assert pruned.tolist() == [[0.0, -4.0, 0.0, -3.0], [0.0, 0.0, -7.0, 8.0]]
    pruned, _ = magnitude_prune(W, 0.5, mask_structure=(1, 4))
    assert pruned.tolist() == [[0.0, -4.0, 2.0, -3.0], [0.0, 6.0, -7.0, 8.0]]


def test_magnitude_dtype_count_and_no_mutation():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 20, generator=gen).bfloat16()
    before = weight.clone()
    pruned, keep = magnitude_prune(weight, 0.3)
    assert pruned.dtype == torch.bfloat16 and keep.dtype == torch.bool
    assert int((~keep).sum()) == int(0.3 * 240) and int((pruned == 0).sum()) == int(0.3 * 240)
    assert torch.equal(pruned[keep], weight[keep]) and torch.equal(weight, before)
    # sparsity 0 keeps everything bit-identical
    pruned, keep = magnitude_prune(weight, 0.0)
    assert keep.all() and torch.equal(pruned, weight)


def test_magnitude_preserve_sparsity_mask():
    weight = torch.tensor([[9.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    # without preserve the zeros have the lowest |w| anyway; preserve matters once they exceed the budget
    pruned, keep = magnitude_prune(weight, 0.25, preserve_sparsity_mask=True)
    assert keep.tolist() == [[True, False, False, False], [True] * 4]
    pruned, keep = magnitude_prune(weight, 0.25)
    assert int((~keep).sum()) == 2
    weight = torch.tensor([[0.0, 5.0, 6.0, 7.0, 1.0, 0.0, 0.0, 3.0]])
    pruned, keep = magnitude_prune(weight, 0.5, mask_structure=(1, 4), preserve_sparsity_mask=True)
    assert torch.equal(pruned, weight)
    assert keep.tolist() == [[False, True, True, True, True, False, False, True]]
    # without preserve only one zero per group is counted as pruned (the first, by position)
    _, keep = magnitude_prune(weight, 0.5, mask_structure=(1, 4))
    assert keep.tolist() == [[False, True, True, True, True, False, True, True]]


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: magnitude_prune(W, 1.5), "sparsity"),
        (lambda: magnitude_prune(W, 0.5, mask_structure=(4, 2)), "mask_structure"),
        (lambda: magnitude_prune(W.flatten(), 0.5), "weight"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()
