"""Calibration: ECE and NLL by hand, the noise-corrected temperature fit on
posteriors whose temperature is known, the transition matrices of the synthetic
noises, the refusals and the fall-back, and one run end to end."""

import json
import logging

import numpy as np
import pytest
from conftest import run_module, tiny_run_config, toy_npz

from galkeras import calibration, noise

# Each row's top probability lies inside one bin, away from the bin edges.
PROBABILITIES = np.array(
    [
        [0.95, 0.03, 0.02],  # bin 9, class 0
        [0.03, 0.95, 0.02],  # bin 9, class 1
        [0.18, 0.20, 0.62],  # bin 6, class 2
        [0.45, 0.30, 0.25],  # bin 4, class 0
        [0.25, 0.55, 0.20],  # bin 5, class 1
    ]
)
LABELS = np.array([0, 0, 2, 1, 1])


def test_ece_and_its_bins_against_a_hand_computation():
    bins = calibration.reliability(PROBABILITIES, LABELS)
    np.testing.assert_array_equal(bins.count, [0, 0, 0, 0, 1, 1, 1, 0, 0, 2])
    np.testing.assert_allclose(bins.confidence[[4, 5, 6, 9]], [0.45, 0.55, 0.62, 0.95])
    np.testing.assert_allclose(bins.accuracy[[4, 5, 6, 9]], [0, 1, 1, 0.5])
    assert np.isnan(bins.confidence[0]) and np.isnan(bins.accuracy[0])
    # Σ |B|/N · |acc − conf|: bin 9 2/5·0.45, bin 6 1/5·0.38, bin 4 1/5·0.45,
    # bin 5 1/5·0.45.
    hand = 2 / 5 * 0.45 + 0.38 / 5 + 0.45 / 5 + 0.45 / 5
    assert calibration.expected_calibration_error(PROBABILITIES, LABELS) == (
        pytest.approx(hand)
    )
    # A certain prediction lies in the last bin, (0.9, 1].
    one_hot = calibration.reliability(np.eye(3), [0, 1, 0])
    assert one_hot.count[-1] == 3 and one_hot.accuracy[-1] == pytest.approx(2 / 3)
    assert one_hot.ece == pytest.approx(1 / 3)
    assert bins.as_dict()["confidence"][0] is None


def test_nll_and_measures_at_a_temperature_against_numpy():
    logits = np.log(PROBABILITIES) * 3.0
    nll = calibration.negative_log_likelihood(logits, LABELS, temperature=3.0)
    assert nll == pytest.approx(-np.mean(np.log(PROBABILITIES[np.arange(5), LABELS])))
    m = calibration.measures(logits, LABELS, temperature=3.0)
    assert m["ece"] == pytest.approx(
        calibration.expected_calibration_error(PROBABILITIES, LABELS)
    )
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["mean_confidence"] == pytest.approx(PROBABILITIES.max(1).mean())
    json.dumps(m)  # JSON-ready


def _noisy_sample(t_true, matrix, n=20000, seed=0):
    """Clean posteriors with a known temperature: `logits = t_true · log p`, so
    `softmax(logits / t_true) = p`; noisy labels drawn from `Tᵀ p`."""
    rng = np.random.default_rng(seed)
    k = len(matrix)
    p_clean = rng.dirichlet(np.full(k, 0.5), size=n)
    p_noisy = p_clean @ matrix
    noisy = (p_noisy.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return np.log(p_clean) * t_true, np.minimum(noisy, k - 1)


@pytest.mark.parametrize(
    "noise_type, rate, t_true",
    [("sym", 0.4, 0.5), ("pairflip", 0.3, 2.0), ("none", 0.0, 0.7)],
)
def test_the_fit_recovers_the_temperature_of_known_posteriors(noise_type, rate, t_true):
    matrix = noise.transition_matrix(noise_type, rate, 4)
    logits, noisy = _noisy_sample(t_true, matrix)
    fit = calibration.fit_temperature(logits, noisy, matrix)
    assert fit.temperature == pytest.approx(t_true, rel=0.05)
    assert not fit.at_bound
    if noise_type != "none":
        # Plain temperature scaling on the noisy labels softens the posteriors
        # towards the noisy label frequencies.
        plain = calibration.fit_temperature(logits, noisy, np.eye(4))
        assert plain.temperature > 1.4 * t_true


def test_the_likelihood_interval_is_where_the_total_nll_rises_by_1_92():
    matrix = noise.transition_matrix("sym", 0.4, 4)
    widths = []
    for n in (20000, 500):
        logits, noisy = _noisy_sample(0.5, matrix, n=n)
        fit = calibration.fit_temperature(logits, noisy, matrix)
        low, high = fit.interval
        assert low < 0.5 < high and not fit.interval_open
        for end in fit.interval:  # by hand: the total NLL 1.92 above its minimum
            rise = n * (
                calibration.noisy_label_nll(logits, noisy, matrix, end) - fit.noisy_nll
            )
            assert rise == pytest.approx(1.92, abs=0.02)
        widths.append(high / low)
    assert widths[0] < 1.2 < 1.5 < widths[1]  # fewer labels, a wider interval


def test_labels_that_leave_the_temperature_open_fall_back_to_none(caplog):
    # 80% symmetric noise over 4 classes: each label says little about the
    # clean class, and 40 of them do not rule out t -> 0.
    matrix = noise.transition_matrix("sym", 0.7, 4)
    logits, noisy = _noisy_sample(0.5, matrix, n=40)
    fit = calibration.fit_temperature(logits, noisy, matrix)
    assert fit.interval_open
    with caplog.at_level(logging.WARNING):
        result = calibration.calibrate(logits, noisy, "sym", 0.7, fitted_on="heldout")
    assert result.method == "none" and result.temperature == 1.0
    assert "40 noisy labels (heldout) do not determine" in result.fallback
    assert "--noisy_validation_split" in caplog.text


def test_the_fit_stops_at_its_range_and_says_so():
    # Labels that always follow the logits' argmax: sharper is always better
    # (and the gap is small enough that t = 0.01 does not saturate the softmax).
    logits = np.array([[0.01, 0.0], [0.0, 0.01]] * 50)
    fit = calibration.fit_temperature(logits, np.array([0, 1] * 50), np.eye(2))
    low = calibration.TEMPERATURE_BOUNDS[0]
    assert fit.at_bound and fit.temperature == pytest.approx(low, rel=1e-3)


HAND_MATRICES = {
    # sym: 1 − r kept, r spread over the K − 1 other classes (never the true one).
    ("sym", 0.3): [
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.7, 0.1, 0.1],
        [0.1, 0.1, 0.7, 0.1],
        [0.1, 0.1, 0.1, 0.7],
    ],
    # sym_inclusive: r redrawn over all K classes, the true one included.
    ("sym_inclusive", 0.4): [
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.7, 0.1, 0.1],
        [0.1, 0.1, 0.7, 0.1],
        [0.1, 0.1, 0.1, 0.7],
    ],
    ("pairflip", 0.2): [
        [0.8, 0.2, 0.0, 0.0],
        [0.0, 0.8, 0.2, 0.0],
        [0.0, 0.0, 0.8, 0.2],
        [0.2, 0.0, 0.0, 0.8],
    ],
}


@pytest.mark.parametrize("noise_type, rate", list(HAND_MATRICES))
def test_known_matrices_equal_the_hand_ones_and_noise_pys_flips(noise_type, rate):
    matrix = calibration.known_transition_matrix(noise_type, rate, 4)
    np.testing.assert_allclose(matrix, HAND_MATRICES[noise_type, rate], atol=1e-12)
    clean = np.repeat(np.arange(4), 25000)
    noisy = noise.apply_label_noise(clean, noise_type, rate, 4, seed=1)
    flips = np.zeros((4, 4))
    np.add.at(flips, (clean, noisy), 1)
    np.testing.assert_allclose(flips / 25000, matrix, atol=0.01)


def test_the_cifar10_asym_matrix_equals_its_flips_and_none_is_unknown():
    matrix = calibration.known_transition_matrix("asym", 0.4, 10, "cifar10")
    hand = np.eye(10)
    # truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
    for source, target in {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}.items():
        hand[source, source], hand[source, target] = 0.6, 0.4
    np.testing.assert_allclose(matrix, hand)
    clean = np.repeat(np.arange(10), 10000)
    noisy = noise.apply_label_noise(clean, "asym", 0.4, 10, 2, dataset="cifar10")
    flips = np.zeros((10, 10))
    np.add.at(flips, (clean, noisy), 1)
    np.testing.assert_allclose(flips / 10000, hand, atol=0.015)
    assert calibration.known_transition_matrix("none", 0.5, 10) is None
    assert calibration.known_transition_matrix("aggre", 0.0, 10) is None


@pytest.mark.parametrize(
    "matrix, named",
    [
        (np.full((3, 3), 0.3), "row 0 sums to 0.9"),
        ([[1.2, -0.2], [0.0, 1.0]], "negative or non-finite"),
        (np.ones((2, 3)) / 3, "square"),
        # Symmetric noise near (K − 1) / K: the rows are nearly identical.
        (noise.transition_matrix("sym", 0.895, 10), "(nearly) singular"),
        (noise.transition_matrix("pairflip", 0.5, 4), "(nearly) singular"),
    ],
    ids=["rows_sum_to_0.9", "negative", "not_square", "sym_89.5", "pairflip_50"],
)
def test_a_matrix_that_makes_the_fit_meaningless_is_refused_by_name(matrix, named):
    k = np.shape(matrix)[0]
    with pytest.raises(ValueError, match="transition matrix") as raised:
        calibration.fit_temperature(np.zeros((4, k)), np.arange(4) % k, matrix)
    assert named in str(raised.value)
    # Still usable: the sym rate 0.8 of Table 1 on 10 classes (cond 9).
    calibration.check_transition_matrix(noise.transition_matrix("sym", 0.8, 10))


def test_without_a_usable_matrix_calibration_falls_back_with_a_warning(caplog):
    logits, noisy = _noisy_sample(1.0, np.eye(3), n=60)
    noisy[noisy == 2] = 0  # class 2 never given: confident learning can't count it
    with caplog.at_level(logging.WARNING):
        result = calibration.calibrate(logits, noisy, "none", 0.0, fitted_on="heldout")
    assert result.method == "none" and result.temperature == 1.0
    assert "class 2 has 0 noisy labels" in result.fallback
    assert "falls back to none" in caplog.text and "class 2" in caplog.text
    with caplog.at_level(logging.WARNING):
        # 3 classes: the rows of sym noise become identical at the rate 2/3.
        result = calibration.calibrate(logits, noisy, "sym", 0.666, fitted_on="heldout")
    assert result.method == "none" and "(nearly) singular" in result.fallback
    # Estimated where the run did not make the noise.
    logits, noisy = _noisy_sample(0.5, noise.transition_matrix("sym", 0.2, 3), n=3000)
    result = calibration.calibrate(logits, noisy, "none", 0.0, fitted_on="training_set")
    assert result.method == "noise_corrected" and result.transition == "estimated"
    assert result.fitted_on == "training_set" and result.fit_samples == 3000
    np.testing.assert_allclose(result.matrix.sum(axis=1), 1.0)
    assert calibration.calibrate(logits, noisy, "sym", 0.2, method="none").method == (
        "none"
    )
    with pytest.raises(ValueError, match="platt"):
        calibration.calibrate(logits, noisy, "sym", 0.2, method="platt")


@pytest.mark.large
def test_a_run_serves_its_calibrated_network_and_from_run_recomputes_it(tmp_path):
    import tensorflow as tf

    from galkeras import export, summary, train

    path = tmp_path / "toy.npz"
    # CE, whose network learns this toy within seconds (θC, which learns from
    # the twins, is still at chance here), and 120 held-out labels: with fewer,
    # or a network at chance, the labels leave t open and the run serves
    # uncalibrated probabilities (tested above). The export path is the same.
    images, labels, test_images, test_labels = toy_npz(path, n=300, n_test=30)
    config = tiny_run_config(
        tmp_path,
        f"npz:{path}",
        method="ce",
        warmup_epochs=12,  # GAL's flag: the other methods take its default
        noise_rate=0.3,
        batch_size=30,
        noisy_validation_split=0.4,
        epochs=6,
        lr=0.1,
        backbone_width=8,
    )
    result = train.run(config)
    entry = result["calibration"]
    assert set(entry["networks"]) == {"net"}
    served = entry["served"]
    assert served["network"] == "net" and served["method"] == "noise_corrected"
    assert served["transition"] == "known" and served["fitted_on"] == "heldout"
    assert served["fit_samples"] == result["heldout_examples"] > 0
    low, high = served["interval"]
    assert low < served["temperature"] < high
    t = served["temperature"]
    assert 0 < t and t != 1.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["calibration"] == json.loads(json.dumps(entry))
    text = summary.format_summary(result)
    assert "ECE" in text and "NLL" in text
    assert f"noise-corrected temperature {t:.4g}" in text
    assert "net.keras stays uncalibrated" in text

    # The export divides the logits by t; net.keras keeps them as they are.
    student = export.load_keras_model(result["keras_path"])
    logits = student.predict(test_images, verbose=0).astype(np.float64)
    loaded = tf.saved_model.load(result["export_path"])
    outputs = loaded.signatures["serving_default"](image=tf.constant(test_images))
    np.testing.assert_allclose(
        outputs["probabilities"].numpy(), calibration.softmax(logits, t), atol=1e-5
    )
    np.testing.assert_array_equal(outputs["class_id"].numpy(), logits.argmax(1))
    assert served["ece"] == pytest.approx(
        calibration.expected_calibration_error(
            calibration.softmax(logits, t), test_labels
        ),
        abs=1e-5,
    )

    # Recomputed from the checkpoint: the same numbers, nothing written.
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    again, again_entry = calibration.from_run(str(tmp_path / "run"))
    assert again.temperature == pytest.approx(t, rel=1e-5)
    assert again_entry["networks"]["net"]["ece"] == pytest.approx(
        entry["networks"]["net"]["ece"], abs=1e-6
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    none, _ = calibration.from_run(str(tmp_path / "run"), calibration="none")
    assert none.temperature == 1.0


def test_an_unknown_calibrate_exits_2_before_training(tmp_path):
    result = run_module(
        "galkeras.train", "--calibrate=platt", f"--model_dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--calibrate='platt' is unknown" in result.stderr
    assert "'noise_corrected'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_summary_flags_a_wide_interval_and_an_estimated_transition():
    from galkeras import summary

    def line(interval, transition="known"):
        served = {
            "network": "student",
            "method": "noise_corrected",
            "temperature": 0.5,
            "transition": transition,
            "fitted_on": "heldout",
            "fit_samples": 300,
            "interval": interval,
            "ece": 0.02,
            "nll": 0.9,
        }
        networks = {"student": {"ece": 0.3, "nll": 1.2}}
        return summary.served_line({"served": served, "networks": networks}, {})

    # high / low = 1.25 (about 2,000 sym-50% labels) against 2.0 (about 300).
    assert "loosely determined" not in line([0.44, 0.55])
    wide = line([0.35, 0.70])
    assert "(95% interval 0.35-0.7)" in wide
    assert "loosely determined: hold out more labels (--noisy_validation_split)" in wide
    # An estimated T is flagged as the over-sharpening risk it is.
    assert "overstate the noise" not in wide
    assert "an estimated T tends to overstate the noise" in line(
        [0.44, 0.55], "estimated"
    )
