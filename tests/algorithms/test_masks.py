import pytest
import torch

from service.algorithms.masks import keep_mask, nm_keep_mask, parse_mask_structure, unstructured_keep_mask


@pytest.mark.parametrize(
    "value, expected",
    [("0:0", (0, 0)), ("2:4", (2, 4)), ("1:4", (1, 4)), ("4:8", (4, 8)), ("1:2", (1, 2)), ("16:32", (16, 32))],
)
def test_parse_mask_structure_good(value, expected):
    assert parse_mask_structure(value) == expected


@pytest.mark.parametrize(
    "value", ["3:2", "a:b", "4:4", "2", "", "0:4", "2:0", "-1:4", "2:4:8", " 2:4", "2.0:4", "1:0", ":"]
)
def test_parse_mask_structure_bad(value):
    with pytest.raises(ValueError) as info:
        parse_mask_structure(value)
    message = str(info.value)
    assert "mask_structure" in message and "'0:0'" in message and "N:M" in message
    assert repr(value) in message


def test_unstructured_exact_count_and_lowest_pruned():
    scores = torch.tensor([[5.0, 1.0, 3.0], [0.5, 4.0, 2.0]])
    keep = unstructured_keep_mask(scores, 0.5)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    # int(0.5 * 6) = 3 lowest: 0.5, 1.0, 2.0
    assert keep.tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99])
def test_unstructured_count_is_int_sparsity_times_numel(sparsity):
    scores = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    keep = unstructured_keep_mask(scores, sparsity)
    assert int((~keep).sum()) == int(sparsity * scores.numel())


def test_unstructured_ties_do_not_over_prune_and_are_deterministic():
    scores = torch.ones(4, 6)  # every score ties
    keep = unstructured_keep_mask(scores, 0.5)
    assert int((~keep).sum()) == 12
    # ties broken by position: the first 12 flat positions go
    assert (~keep).flatten()[:12].all() and keep.flatten()[12:].all()
    assert torch.equal(keep, unstructured_keep_mask(scores, 0.5))
    # sparsity 0 on all-equal (and all-zero) scores prunes nothing
    assert unstructured_keep_mask(torch.zeros(3, 3), 0.0).all()


def test_unstructured_per_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0], [7.0, 7.0, 7.0, 7.0]])
    keep = unstructured_keep_mask(scores, 0.5, per_row=True)
    assert keep.tolist() == [
        [False, False, True, True],
        [True, True, False, False],
        [False, False, True, True],
    ]
    scores = torch.randn(9, 11, generator=torch.Generator().manual_seed(1))
    keep = unstructured_keep_mask(scores, 0.4, per_row=True)
    assert ((~keep).sum(dim=1) == int(0.4 * 11)).all()
    with pytest.raises(ValueError, match="per_row"):
        unstructured_keep_mask(torch.randn(2, 3, 4), 0.5, per_row=True)


def test_unstructured_forced_prune_counts_first():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    forced = torch.tensor([False, False, False, False, True, False])
    keep = unstructured_keep_mask(scores, 0.5, forced_prune=forced)
    # budget 3: the forced one (score 5) plus the two lowest
    assert keep.tolist() == [False, False, True, True, False, True]
    # forced exceed the budget: all of them pruned, nothing else
    forced = torch.tensor([False, True, True, True, True, False])
    keep = unstructured_keep_mask(scores, 0.5, forced_prune=forced)
    assert keep.tolist() == [True, False, False, False, False, True]
    # budget 0: forced still pruned
    keep = unstructured_keep_mask(scores, 0.0, forced_prune=forced)
    assert keep.tolist() == [True, False, False, False, False, True]


def test_forced_prune_first_even_below_negative_scores():
    scores = torch.tensor([[-3.0, -2.0, -1.0, 4.0, 5.0, 6.0, -4.0, 7.0]])
    forced = torch.zeros(1, 8, dtype=torch.bool)
    forced[0, 4] = True
    keep = unstructured_keep_mask(scores, 0.25, forced_prune=forced)
    assert keep.tolist() == [[True, True, True, True, False, True, False, True]]
    keep = nm_keep_mask(scores, 2, 4, forced_prune=forced)
    assert keep.tolist() == [[False, False, True, True, False, True, False, True]]


def test_unstructured_forced_prune_per_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    forced = torch.tensor([[False, False, False, True], [True, True, True, False]])
    keep = unstructured_keep_mask(scores, 0.5, per_row=True, forced_prune=forced)
    assert keep.tolist() == [[False, True, True, False], [False, False, False, True]]


def test_unstructured_bad_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_keep_mask(torch.randn(4), 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_keep_mask(torch.randn(4), -0.1)
    with pytest.raises(ValueError, match="forced_prune"):
        unstructured_keep_mask(torch.randn(4), 0.5, forced_prune=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="forced_prune"):
        unstructured_keep_mask(torch.randn(4), 0.5, forced_prune=torch.zeros(4))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 4)])
def test_nm_exact_per_group(n, m):
    scores = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    keep = nm_keep_mask(scores, n, m)
    groups_keep = keep.reshape(6, 4, m)
    assert ((~groups_keep).sum(-1) == n).all()
    # the pruned ones are the n lowest of each group
    grouped = scores.reshape(6, 4, m)
    pruned_max = torch.where(~groups_keep, grouped, torch.full_like(grouped, -torch.inf)).amax(-1)
    kept_min = torch.where(groups_keep, grouped, torch.full_like(grouped, torch.inf)).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_hand_example_and_ties():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    keep = nm_keep_mask(scores, 2, 4)
    assert keep.tolist() == [[True, False, True, False, False, False, True, True]]


def test_nm_forced_prune():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 4.0, 1.0, 3.0, 2.0]])
    forced = torch.tensor([[True, False, False, False, True, True, True, False]])
    keep = nm_keep_mask(scores, 2, 4, forced_prune=forced)
    # group 1: forced 4.0 plus lowest 1.0; group 2: three forced, more than n, nothing else
    assert keep.tolist() == [[False, False, True, True, False, False, False, True]]


def test_nm_bad_shapes_and_structure():
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        nm_keep_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        nm_keep_mask(torch.randn(12), 2, 4)
    with pytest.raises(ValueError, match="mask_structure"):
        nm_keep_mask(torch.randn(3, 8), 4, 4)
    with pytest.raises(ValueError, match="mask_structure"):
        nm_keep_mask(torch.randn(3, 8), 0, 4)


def test_keep_mask_dispatch():
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(keep_mask(scores, 0.5, (0, 0)), unstructured_keep_mask(scores, 0.5))
    assert torch.equal(keep_mask(scores, 0.5, (0, 0), per_row=True), unstructured_keep_mask(scores, 0.5, per_row=True))
    # sparsity ignored for N:M
    assert torch.equal(keep_mask(scores, 0.1, (2, 4)), nm_keep_mask(scores, 2, 4))
    with pytest.raises(ValueError, match="mask_structure"):
        keep_mask(scores, 0.5, (3, 2))
