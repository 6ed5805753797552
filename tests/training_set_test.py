"""The noisy held-out split of `--noisy_validation_split`, against hand counts."""

import numpy as np

from galkeras.training_set import holdout_problems, noisy_holdout_split

# Classes of 10, 5, 3 and 2 samples, interleaved.
LABELS = np.array([0] * 10 + [1] * 5 + [2] * 3 + [3] * 2)[
    np.random.default_rng(7).permutation(20)
]


def test_per_class_held_out_counts_are_round_f_times_n():
    train_ids, heldout_ids = noisy_holdout_split(LABELS, 0.3, seed=0)
    # round(3.0) = 3, round(1.5) = 2 (halves to even), round(0.9) = 1,
    # round(0.6) = 1.
    np.testing.assert_array_equal(np.bincount(LABELS[heldout_ids]), [3, 2, 1, 1])
    np.testing.assert_array_equal(np.bincount(LABELS[train_ids]), [7, 3, 2, 1])
    assert not set(train_ids) & set(heldout_ids)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train_ids, heldout_ids])), np.arange(20)
    )
    assert holdout_problems(LABELS, heldout_ids) == []


def test_the_split_is_a_function_of_the_seed_and_the_labels():
    # What a resumed run relies on: the same labels and seed, the same split.
    first = noisy_holdout_split(LABELS, 0.3, seed=3)
    again = noisy_holdout_split(LABELS.copy(), 0.3, seed=3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other = [noisy_holdout_split(LABELS, 0.3, seed=s)[1] for s in range(4, 8)]
    assert any(not np.array_equal(first[1], o) for o in other)


def test_no_split_holds_out_nothing():
    train_ids, heldout_ids = noisy_holdout_split(LABELS, 0.0, seed=0)
    np.testing.assert_array_equal(train_ids, np.arange(20))
    assert heldout_ids.size == 0 and heldout_ids.dtype == np.int64


def test_problems_name_each_class_left_without_a_held_out_sample():
    labels = np.array([0] * 10 + [1] + [2] * 2)
    _, heldout_ids = noisy_holdout_split(labels, 0.2, seed=0)
    # round(0.2) = 0 for the single sample of class 1, round(0.4) = 0 for class 2.
    problems = holdout_problems(labels, heldout_ids, ("cat", "dog", "2"))
    assert problems == [
        "class 1 ('dog'): 1 noisy-labelled samples, no held-out sample",
        "class 2: 2 noisy-labelled samples, no held-out sample",
    ]
    everything = np.arange(len(labels))
    assert holdout_problems(labels, everything)[0].endswith("no training sample")
