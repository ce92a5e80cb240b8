"""service/algorithms/wanda.py: Wanda's |W| * ||x|| scores and per-row pruning, unstructured and N:M."""

import pytest
import torch

from service.algorithms.wanda import wanda_prune, wanda_scores

W = torch.tensor([[1.0, -4.0, 2.0, -3.0], [5.0, 6.0, -7.0, 8.0]])


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
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()
