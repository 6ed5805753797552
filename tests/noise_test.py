import numpy as np
import pytest

from galkeras import noise

NUM_SAMPLES = 20_000


def balanced_labels(num_classes, num_samples=NUM_SAMPLES):
    return np.arange(num_samples) % num_classes


def test_noise_types():
    assert noise.NOISE_TYPES == ("none", "sym", "sym_inclusive", "pairflip", "asym")


# --- Transition matrices, each against a matrix written out by hand. ---


def test_none_matrix_is_identity():
    np.testing.assert_array_equal(noise.transition_matrix("none", 0.3, 4), np.eye(4))


def test_sym_matrix_excludes_true_class():
    expected = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.1, 0.7, 0.1, 0.1],
            [0.1, 0.1, 0.7, 0.1],
            [0.1, 0.1, 0.1, 0.7],
        ]
    )
    np.testing.assert_allclose(noise.transition_matrix("sym", 0.3, 4), expected)


def test_sym_inclusive_matrix():
    # r = 0.4, K = 4: diagonal 0.6 + 0.1, off-diagonal 0.1.
    expected = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.1, 0.7, 0.1, 0.1],
            [0.1, 0.1, 0.7, 0.1],
            [0.1, 0.1, 0.1, 0.7],
        ]
    )
    np.testing.assert_allclose(
        noise.transition_matrix("sym_inclusive", 0.4, 4), expected
    )


def test_pairflip_matrix():
    expected = np.array(
        [
            [0.8, 0.2, 0.0, 0.0],
            [0.0, 0.8, 0.2, 0.0],
            [0.0, 0.0, 0.8, 0.2],
            [0.2, 0.0, 0.0, 0.8],
        ]
    )
    np.testing.assert_allclose(noise.transition_matrix("pairflip", 0.2, 4), expected)


def test_asym_cifar10_matrix():
    r = 0.4
    expected = np.eye(10)
    # (source, target): truck->automobile, bird->airplane, deer->horse, cat<->dog.
    for source, target in [(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)]:
        expected[source, source] = 1 - r
        expected[source, target] = r
    matrix = noise.transition_matrix("asym", r, 10, dataset="cifar10")
    np.testing.assert_allclose(matrix, expected)
    assert matrix.dtype == np.float64


def test_asym_cifar100_matrix_first_block():
    matrix = noise.transition_matrix("asym", 0.3, 100, dataset="cifar100")
    expected_block = np.array(
        [
            [0.7, 0.3, 0.0, 0.0, 0.0],
            [0.0, 0.7, 0.3, 0.0, 0.0],
            [0.0, 0.0, 0.7, 0.3, 0.0],
            [0.0, 0.0, 0.0, 0.7, 0.3],
            [0.3, 0.0, 0.0, 0.0, 0.7],
        ]
    )
    for start in range(0, 100, 5):
        block = slice(start, start + 5)
        np.testing.assert_allclose(matrix[block, block], expected_block)
    # Nothing leaves its block.
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    assert np.count_nonzero(matrix) == 200


@pytest.mark.parametrize(
    "noise_type, dataset, num_classes",
    [
        ("none", None, 7),
        ("sym", None, 7),
        ("sym_inclusive", None, 7),
        ("pairflip", None, 7),
        ("asym", "cifar10", 10),
        ("asym", "cifar100", 100),
    ],
)
def test_rows_sum_to_one(noise_type, dataset, num_classes):
    matrix = noise.transition_matrix(noise_type, 0.45, num_classes, dataset)
    assert matrix.shape == (num_classes, num_classes)
    assert matrix.dtype == np.float64
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


# --- Sampled noise. ---


@pytest.mark.parametrize(
    "noise_type, rate, num_classes, dataset, expected_rate",
    [
        ("sym", 0.2, 10, None, 0.2),
        ("sym", 0.8, 10, None, 0.8),
        ("pairflip", 0.45, 10, None, 0.45),
        # Only 5 of the 10 CIFAR-10 classes flip.
        ("asym", 0.4, 10, "cifar10", 0.4 * 5 / 10),
        ("asym", 0.4, 100, "cifar100", 0.4),
        ("sym_inclusive", 0.5, 10, None, 0.5 * 9 / 10),
    ],
)
def test_empirical_flip_rate(noise_type, rate, num_classes, dataset, expected_rate):
    clean = balanced_labels(num_classes)
    noisy = noise.apply_label_noise(
        clean, noise_type, rate, num_classes, seed=1, dataset=dataset
    )
    assert noisy.dtype == np.int64
    assert noisy.shape == clean.shape
    # 20k Bernoulli draws: 4 standard deviations is under 0.015.
    assert noise.actual_noise_rate(clean, noisy) == pytest.approx(
        expected_rate, abs=0.015
    )


def test_empirical_matrix_matches_transition_matrix():
    clean = balanced_labels(4)
    noisy = noise.apply_label_noise(clean, "sym", 0.6, 4, seed=3)
    counts = np.zeros((4, 4))
    np.add.at(counts, (clean, noisy), 1)
    empirical = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        empirical, noise.transition_matrix("sym", 0.6, 4), atol=0.025
    )


@pytest.mark.parametrize("rate, expected_redrawn", [(0.37, 370), (0.0005, 0)])
def test_sym_inclusive_redraws_exact_count(rate, expected_redrawn):
    # With 100k classes a redrawn label almost never lands on its own class, so
    # the flips count the redrawn labels: exactly round(r N), not a binomial.
    num_classes = 100_000
    clean = np.arange(1000)
    noisy = noise.apply_label_noise(clean, "sym_inclusive", rate, num_classes, seed=0)
    assert expected_redrawn - 1 <= np.count_nonzero(noisy != clean) <= expected_redrawn


def test_sym_never_keeps_class_when_flipped_and_reaches_all_others():
    clean = balanced_labels(5)
    noisy = noise.apply_label_noise(clean, "sym", 0.5, 5, seed=2)
    flipped = noisy != clean
    for true_class in range(5):
        targets = set(noisy[flipped & (clean == true_class)].tolist())
        assert targets == set(range(5)) - {true_class}


def test_pairflip_only_to_next_class():
    clean = balanced_labels(6)
    noisy = noise.apply_label_noise(clean, "pairflip", 0.3, 6, seed=0)
    flipped = noisy != clean
    np.testing.assert_array_equal(noisy[flipped], (clean[flipped] + 1) % 6)
    # Every class flips, including the wrap-around 5 -> 0.
    assert set(clean[flipped].tolist()) == set(range(6))


def test_asym_cifar10_follows_map():
    clean = balanced_labels(10)
    noisy = noise.apply_label_noise(clean, "asym", 0.4, 10, seed=0, dataset="cifar10")
    pairs = set(zip(clean[noisy != clean].tolist(), noisy[noisy != clean].tolist()))
    assert pairs == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}


def test_asym_cifar100_stays_within_blocks():
    clean = balanced_labels(100)
    noisy = noise.apply_label_noise(clean, "asym", 0.4, 100, seed=0, dataset="cifar100")
    flipped = noisy != clean
    source, target = clean[flipped], noisy[flipped]
    np.testing.assert_array_equal(source // 5, target // 5)
    np.testing.assert_array_equal(target % 5, (source % 5 + 1) % 5)


@pytest.mark.parametrize(
    "noise_type, num_classes, dataset",
    [
        ("sym", 10, None),
        ("sym_inclusive", 10, None),
        ("pairflip", 10, None),
        ("asym", 10, "cifar10"),
    ],
)
def test_deterministic_under_seed(noise_type, num_classes, dataset):
    clean = balanced_labels(num_classes, 2000)

    def draw(seed):
        return noise.apply_label_noise(
            clean, noise_type, 0.4, num_classes, seed=seed, dataset=dataset
        )

    np.testing.assert_array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))


def test_none_and_zero_rate_return_a_copy():
    clean = np.array([0, 1, 2, 1], dtype=np.int32)
    for noise_type, rate in [("none", 0.5), ("sym", 0.0)]:
        noisy = noise.apply_label_noise(clean, noise_type, rate, 3, seed=0)
        assert noisy.dtype == np.int64
        np.testing.assert_array_equal(noisy, clean)
        noisy[0] = 2
        assert clean[0] == 0


def test_input_not_modified():
    clean = balanced_labels(10, 500).astype(np.int64)
    before = clean.copy()
    noise.apply_label_noise(clean, "sym", 0.5, 10, seed=0)
    np.testing.assert_array_equal(clean, before)


def test_actual_noise_rate():
    assert noise.actual_noise_rate([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    assert isinstance(noise.actual_noise_rate([1], [1]), float)
    with pytest.raises(ValueError, match="shape"):
        noise.actual_noise_rate([0, 1], [0])


# --- Validation. ---


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_out_of_range(rate):
    with pytest.raises(ValueError, match="noise_rate"):
        noise.transition_matrix("sym", rate, 10)
    with pytest.raises(ValueError, match="noise_rate"):
        noise.apply_label_noise([0, 1], "sym", rate, 10, seed=0)


def test_unknown_noise_type_lists_types():
    with pytest.raises(ValueError, match="pairflip") as info:
        noise.apply_label_noise([0, 1], "symmetric", 0.2, 10, seed=0)
    assert all(noise_type in str(info.value) for noise_type in noise.NOISE_TYPES)


@pytest.mark.parametrize("dataset", [None, "mnist", "cifar10n", "CIFAR10"])
def test_asym_needs_cifar(dataset):
    with pytest.raises(ValueError, match="pairflip"):
        noise.transition_matrix("asym", 0.4, 10, dataset=dataset)


def test_asym_checks_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        noise.transition_matrix("asym", 0.4, 100, dataset="cifar10")


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_labels_out_of_range(labels):
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        noise.apply_label_noise(np.array(labels), "sym", 0.2, 3, seed=0)


def test_labels_must_be_integers():
    with pytest.raises(ValueError, match="integer"):
        noise.apply_label_noise(np.array([0.0, 1.0]), "sym", 0.2, 3, seed=0)
