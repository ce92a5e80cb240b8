import pytest
import torch

from service.algorithms.owl import outlier_ratio, owl_sparsities


def test_outlier_ratio_single_module():
    weight = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
    # scores [1, 1, 1, 10], mean 3.25; threshold 2 * 3.25 = 6.5 -> one outlier of four
    assert outlier_ratio([weight], [torch.ones(4)], 2.0) == pytest.approx(0.25)
    # the input norm enters as sqrt: the same scores from unit weights and norm 100 on the last input
    assert outlier_ratio([torch.ones(1, 4)], [torch.tensor([1.0, 1.0, 1.0, 100.0])], 2.0) == pytest.approx(0.25)
    # a higher multiplier leaves no outlier
    assert outlier_ratio([weight], [torch.ones(4)], 4.0) == 0.0


def test_outlier_ratio_concatenates_modules():
    w1 = torch.tensor([[1.0, -1.0, 1.0, -10.0]])
    w2 = torch.ones(2, 2)
    n2 = torch.tensor([4.0, 4.0])  # scores 2, 2, 2, 2
    # all eight scores [1, 1, 1, 10, 2, 2, 2, 2]: mean 21/8, threshold 5.25 -> 1 of 8.
    # Averaging the two modules' own ratios (0.25 and 0) would give 0.125 too, so also check a lopsided case.
    assert outlier_ratio([w1, w2], [torch.ones(4), n2], 2.0) == pytest.approx(1 / 8)
    w3 = torch.ones(4, 4)  # 16 scores of 1
    # [1, 1, 1, 10] + 16 ones: mean 29/20 = 1.45, threshold 2.9 -> 1 of 20
    assert outlier_ratio([w1, w3], [torch.ones(4), torch.ones(4)], 2.0) == pytest.approx(1 / 20)


def test_outlier_ratio_bad_arguments():
    with pytest.raises(ValueError, match="input_squared_norms"):
        outlier_ratio([torch.ones(2, 2)], [], 5.0)
    with pytest.raises(ValueError, match="owl_m"):
        outlier_ratio([torch.ones(2, 2)], [torch.ones(2)], 0.0)
    with pytest.raises(ValueError, match="input_squared_norm"):
        outlier_ratio([torch.ones(2, 2)], [torch.ones(3)], 5.0)


def test_owl_sparsities_hand_example():
    # r' = [0, 0.08, 0.16], mean 0.08 -> density [0.42, 0.5, 0.58]
    got = owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.08)
    assert got == pytest.approx([0.58, 0.5, 0.42])


def test_owl_sparsities_properties():
    gen = torch.Generator().manual_seed(0)
    ratios = (torch.rand(24, generator=gen) * 0.05).tolist()
    target, lmbda = 0.6, 0.08
    got = owl_sparsities(ratios, target, lmbda)
    assert len(got) == len(ratios)
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-12)
    # OWL's rule spreads the sparsities over exactly 2 * lmbda ...
    assert max(got) - min(got) == pytest.approx(2 * lmbda)
    # ... around the target; each is within target +- lmbda only when the ratios are symmetric,
    # in general within target +- 2 * lmbda
    assert all(target - 2 * lmbda <= s <= target + 2 * lmbda for s in got)
    # more outliers -> lower sparsity (strictly reversed order)
    order_ratios = sorted(range(24), key=lambda i: ratios[i])
    order_sparsity = sorted(range(24), key=lambda i: -got[i])
    assert order_ratios == order_sparsity
    symmetric = owl_sparsities([0.0, 0.25, 0.5, 0.75, 1.0], target, lmbda)
    assert min(symmetric) == pytest.approx(target - lmbda) and max(symmetric) == pytest.approx(target + lmbda)


def test_owl_sparsities_scale_invariant_like_llm_compressor_percent():
    ratios = [0.01, 0.03, 0.02, 0.07]
    assert owl_sparsities([100 * r for r in ratios], 0.5, 0.1) == pytest.approx(owl_sparsities(ratios, 0.5, 0.1))


def test_owl_sparsities_uniform_cases():
    assert owl_sparsities([0.02, 0.02, 0.02], 0.5, 0.1) == [0.5, 0.5, 0.5]
    assert owl_sparsities([0.01, 0.05], 0.5, 0.0) == pytest.approx([0.5, 0.5])
    assert owl_sparsities([], 0.5, 0.1) == []


def test_owl_sparsities_out_of_range():
    with pytest.raises(ValueError, match="owl_lmbda"):
        owl_sparsities([0.0, 1.0], 0.9, 0.2)  # 1.1 for the first
    with pytest.raises(ValueError, match="owl_lmbda"):
        owl_sparsities([0.0, 1.0], 0.05, 0.1)  # -0.05 for the second
    with pytest.raises(ValueError, match="owl_lmbda"):
        owl_sparsities([0.0, 1.0], 0.5, -0.1)
    with pytest.raises(ValueError, match="target"):
        owl_sparsities([0.0, 1.0], 1.0, 0.1)
