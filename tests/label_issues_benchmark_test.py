"""The label-issue benchmark's measures and folds, against hand computations."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import label_issues as benchmark  # noqa: E402


def test_detection_measures_against_a_hand_count():
    # Six samples, flips at 1, 3 and 4; the ranking (low quality first) is
    # 1, 3, 0, 4, 2, 5, so the top k = 3 hold two flips.
    quality = np.array([0.3, 0.1, 0.5, 0.2, 0.4, 0.9])
    flipped = np.array([False, True, False, True, True, False])
    is_issue = np.array([True, True, False, False, False, False])
    result = benchmark.detection(quality, is_issue, flipped)
    assert result["flips"] == 3 and result["issues"] == 2
    assert result["precision_at_k"] == result["recall_at_k"] == pytest.approx(2 / 3)
    assert result["issue_precision"] == 0.5 and result["issue_recall"] == 1 / 3
    # AUROC: of the 9 (flip, clean) pairs, the flip scores lower in 8.
    assert result["auroc"] == pytest.approx(8 / 9)
    # AUPRC (average precision): flips found at ranks 1, 2 and 4.
    assert result["auprc"] == pytest.approx((1 + 1 + 3 / 4) / 3)


def test_folds_cover_every_sample_once_stratified_by_noisy_label():
    noisy = np.repeat([0, 1, 2], 10)
    folds = benchmark.folds_of(noisy, 5, seed=0)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(30))
    for train_ids, held_ids in folds:
        assert not set(train_ids) & set(held_ids)
        np.testing.assert_array_equal(np.bincount(noisy[held_ids]), [2, 2, 2])
