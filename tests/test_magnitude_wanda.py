import pytest
import torch

from service.magnitude import magnitude_prune
from service.wanda import wanda_prune, wanda_scores

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


def test_wanda_scores_and_per_row_pruning():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    norm = torch.tensor([16.0, 4.0, 1.0, 0.25])  # sqrt -> [4, 2, 1, 0.5]
    assert wanda_scores(weight, norm).tolist() == [[4.0, 4.0, 3.0, 2.0], [16.0, 6.0, 2.0, 0.5]]
    pruned, keep = wanda_prune(weight, norm, 0.5)
    # magnitude alone would prune 1 and -2 in row 0; the activation norms flip it
    assert pruned.tolist() == [[1.0, -2.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]]
    assert keep.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_wanda_per_row_count_even_with_one_dominant_row():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 40, generator=gen)
    weight[3] *= 1000.0  # per-matrix ranking would spare this row entirely
    norm = torch.rand(40, generator=gen) * 10
    pruned, keep = wanda_prune(weight, norm, 0.3)
    assert ((~keep).sum(dim=1) == int(0.3 * 40)).all()
    assert ((pruned == 0).sum(dim=1) == int(0.3 * 40)).all()


def test_wanda_nm_and_dtype():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0, 8.0, 1.0, 2.0, 4.0]]).half()
    norm = torch.tensor([1.0, 4.0, 9.0, 16.0, 1.0, 1.0, 1.0, 1.0])
    pruned, keep = wanda_prune(weight, norm, 0.0, mask_structure=(2, 4))
    assert pruned.dtype == torch.float16
    assert pruned.tolist() == [[0.0, 0.0, 1.0, 1.0, 8.0, 0.0, 0.0, 4.0]]
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 32, generator=gen)
    _, keep = wanda_prune(weight, torch.rand(32, generator=gen), 0.5, mask_structure=(4, 8))
    assert ((~keep).reshape(8, 4, 8).sum(-1) == 4).all()


def test_wanda_preserve_sparsity_mask():
    weight = torch.tensor([[0.0, 0.0, 0.0, 5.0, 6.0, 7.0], [1.0, 0.0, 2.0, 3.0, 4.0, 5.0]])
    norm = torch.tensor([1.0, 1.0, 1.0, 1e-8, 1.0, 1.0])
    # budget int(0.34 * 6) = 2 per row; row 0 already has three zeros: all pruned, nothing else
    pruned, keep = wanda_prune(weight, norm, 0.34, preserve_sparsity_mask=True)
    assert keep.tolist() == [[False, False, False, True, True, True], [True, False, True, False, True, True]]
    assert torch.equal(pruned, torch.tensor([[0.0, 0.0, 0.0, 5.0, 6.0, 7.0], [1.0, 0.0, 2.0, 0.0, 4.0, 5.0]]))
    # without preserve, row 0 counts only two zeros as pruned and the tiny-norm 5.0 is spared
    _, keep = wanda_prune(weight, norm, 0.34)
    assert keep.tolist() == [[False, False, True, True, True, True], [True, False, True, False, True, True]]


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: wanda_prune(W, torch.ones(3), 0.5), "input_squared_norm"),
        (lambda: wanda_prune(W, torch.ones(4), 1.0), "sparsity"),
        (lambda: wanda_prune(W, torch.ones(4), 0.5, mask_structure=(2, 3)), r"\(2, 4\)"),
        (lambda: magnitude_prune(W, 1.5), "sparsity"),
        (lambda: magnitude_prune(W, 0.5, mask_structure=(4, 2)), "mask_structure"),
        (lambda: magnitude_prune(W.flatten(), 0.5), "weight"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()
