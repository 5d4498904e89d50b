"""Tests of hf_aace.data.noise: symmetric label noise on the training labels."""

import math

import pytest
import torch

from hf_aace.data import symmetric_label_noise


def labels_of(count: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_classes, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("count, p", [(1437, 0.2), (1437, 0.5), (1000, 0.37), (7, 0.1), (10, 0.0)])
def test_corrupts_exactly_round_p_n_labels_each_to_another_class(count, p):
    labels = labels_of(count, 10)
    original = labels.clone()
    noisy, corrupted = symmetric_label_noise(labels, num_classes=10, p=p, seed=3)

    assert torch.equal(labels, original)  # the input is left alone
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert len(corrupted) == round(p * count)
    assert corrupted.tolist() == sorted(set(corrupted.tolist()))
    changed = (noisy != labels).nonzero().flatten()
    assert torch.equal(changed, corrupted)  # every corrupted label differs, every other one is kept
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_same_seed_same_labels_and_another_seed_other_ones():
    labels = labels_of(1437, 10)
    first = symmetric_label_noise(labels, 10, 0.2, seed=5)
    again = symmetric_label_noise(labels, 10, 0.2, seed=5)
    other = symmetric_label_noise(labels, 10, 0.2, seed=6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[0], other[0])


def test_new_classes_are_uniform_over_the_wrong_classes():
    num_classes, count = 5, 50_000
    labels = torch.zeros(count, dtype=torch.int64)
    noisy, corrupted = symmetric_label_noise(labels, num_classes, 0.4, seed=0)
    frequencies = torch.bincount(noisy[corrupted], minlength=num_classes).double() / len(corrupted)
    assert frequencies[0] == 0
    # 20,000 draws over 4 classes: each share is 0.25 within a few standard errors (about 0.003).
    torch.testing.assert_close(frequencies[1:], torch.full((4,), 0.25, dtype=torch.float64), atol=0.012, rtol=0)


def test_which_labels_are_picked_does_not_depend_on_their_values():
    """The picked positions come from the seed alone, so runs with different labels share the same noisy indices."""
    _, first = symmetric_label_noise(labels_of(500, 10, seed=1), 10, 0.3, seed=9)
    _, second = symmetric_label_noise(labels_of(500, 10, seed=2), 10, 0.3, seed=9)
    assert torch.equal(first, second)


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, math.nan, math.inf, "0.2", None])
def test_rejects_rates_outside_zero_to_one(p):
    with pytest.raises(ValueError, match=r"finite number in \[0, 1\)"):
        symmetric_label_noise(labels_of(10, 3), 3, p, seed=0)


def test_rejects_bad_labels_and_class_counts():
    with pytest.raises(ValueError, match="at least 2 classes"):
        symmetric_label_noise(torch.zeros(4, dtype=torch.int64), 1, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        symmetric_label_noise(torch.tensor([0, 1, 3]), 3, 0.5, seed=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        symmetric_label_noise(torch.zeros(4), 3, 0.5, seed=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        symmetric_label_noise(torch.zeros(2, 2, dtype=torch.int64), 3, 0.5, seed=0)
