"""The calibration sample-size benchmark, on posteriors whose truth is known."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import calibration_sample_size as benchmark  # noqa: E402


def _calibrated(n, k, temperature, seed=0):
    """Logits whose `softmax(z / temperature)` is the true clean posterior the
    labels are drawn from: the right temperature to serve is `temperature`."""
    rng = np.random.default_rng(seed)
    posterior = rng.dirichlet(np.full(k, 0.3), size=n)
    labels = (rng.random(n)[:, None] > posterior.cumsum(1)).sum(1).clip(0, k - 1)
    return np.log(posterior) * temperature, labels


def test_a_known_temperature_is_recovered_from_enough_noisy_labels():
    # Logits twice as sharp as they should be (true t = 2): the best single
    # temperature on the clean labels is near 2 and reaches a small ECE, and
    # fits on 1,500 sym-20% noisy labels calibrate every draw, while fits on
    # 30 labels miss more often than not.
    logits, labels = _calibrated(6000, 4, 2.0)
    best, best_t = benchmark.best_single_temperature(logits, labels)
    assert best < 0.02 and best_t == pytest.approx(2.0, rel=0.15)
    curve = benchmark.sample_size_curve(
        logits, labels, ("sym", 0.2, None), [30, 1500, 4000], draws=6, target=0.05
    )
    assert set(curve) == {30, 1500}  # 4,000 is more than half of the samples
    share, median, p90 = curve[1500]
    assert share == 1.0 and median <= p90 < 0.05
    assert curve[30][0] < 0.5 and curve[30][1] > 2 * median
