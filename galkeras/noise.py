"""Synthetic label noise (paper §4.1.1).

The paper corrupts the clean CIFAR labels with symmetric ("Sym") and asymmetric
("Asym") noise, following Co-teaching and JoCoR. Every noise process here is a
class-conditional transition matrix `T`, where `T[i, j]` is the probability that
a sample of true class `i` is annotated as class `j`, except `sym_inclusive`,
which redraws an exact number of labels (DivideMix/ELR style).

Noisy labels are a deterministic function of the clean labels, the noise type,
the rate and the seed, so a run can be reproduced and its labels saved. The
noise is applied once, in NumPy, before the input pipeline is built.

Example:

>>> clean = np.array([0, 1, 2, 3] * 1000)
>>> noisy = apply_label_noise(clean, "sym", 0.2, num_classes=4, seed=0)
>>> round(actual_noise_rate(clean, noisy), 1)
0.2
"""

import numpy as np

NOISE_TYPES = ("none", "sym", "sym_inclusive", "pairflip", "asym")

# Co-teaching's CIFAR-10 asymmetric map: visually similar classes.
# truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
_CIFAR10_ASYM_FLIPS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
_CIFAR100_BLOCK = 5
_ASYM_DATASETS = {"cifar10": 10, "cifar100": 100}


def _check_noise_args(noise_type, rate, num_classes, dataset):
    if noise_type not in NOISE_TYPES:
        raise ValueError(
            f"Unknown noise type {noise_type!r}; choose one of {NOISE_TYPES}."
        )
    if isinstance(rate, bool) or not isinstance(
        rate, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"noise_rate must be a number in [0, 1), got {rate!r}.")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {rate}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}.")
    if num_classes < 2 and noise_type != "none":
        raise ValueError(f"Label noise needs num_classes >= 2, got {num_classes}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if noise_type == "asym":
        _check_asym_dataset(num_classes, dataset)


def _check_asym_dataset(num_classes, dataset):
    if dataset not in _ASYM_DATASETS:
        raise ValueError(
            f"Noise type 'asym' is defined only for datasets 'cifar10' and "
            f"'cifar100', got dataset={dataset!r}. For another dataset use "
            f"'pairflip' (i -> i+1 mod K with probability noise_rate)."
        )
    if num_classes != _ASYM_DATASETS[dataset]:
        raise ValueError(
            f"Noise type 'asym' for {dataset!r} needs num_classes="
            f"{_ASYM_DATASETS[dataset]}, got {num_classes}."
        )


def _asym_matrix(rate, num_classes, dataset):
    flips = np.arange(num_classes)
    if dataset == "cifar10":
        for source, target in _CIFAR10_ASYM_FLIPS.items():
            flips[source] = target
    else:
        # Within each block of 5 consecutive fine ids, i -> i+1, circular.
        block_start = flips - flips % _CIFAR100_BLOCK
        flips = block_start + (flips + 1) % _CIFAR100_BLOCK
    matrix = np.eye(num_classes)
    flipped = np.flatnonzero(flips != np.arange(num_classes))
    matrix[flipped, flipped] = 1.0 - rate
    matrix[flipped, flips[flipped]] = rate
    return matrix


def transition_matrix(noise_type, rate, num_classes, dataset=None):
    """Returns the label-noise transition matrix (paper §4.1.1).

    `T[i, j]` is the probability that a sample of true class `i` is annotated
    as class `j`; every row sums to 1.

    - `none`: the identity.
    - `sym`: `1 - r` on the diagonal and `r / (K - 1)` elsewhere; the true class
      is excluded from the flips, as in the Co-teaching/JoCoR code the paper
      compares against. The expected flip rate is `r`.
    - `sym_inclusive`: `(1 - r) + r / K` on the diagonal and `r / K` elsewhere,
      the expected matrix of redrawing an `r` fraction of labels uniformly over
      all `K` classes (DivideMix/ELR). The effective flip rate is `r (K-1) / K`.
    - `pairflip`: `i -> (i + 1) mod K` with probability `r`.
    - `asym`: for `dataset="cifar10"`, truck -> automobile, bird -> airplane,
      deer -> horse and cat <-> dog, each with probability `r`; the other
      classes are untouched. For `dataset="cifar100"`, within each block of 5
      consecutive fine-label ids, `i -> i + 1` circular within the block, with
      probability `r`.

    Args:
        noise_type: str. One of `NOISE_TYPES`.
        rate: float. The noise rate `r`, in `[0, 1)`.
        num_classes: int. The number of classes `K`.
        dataset: str or None. Required for `asym`: `"cifar10"` or `"cifar100"`.

    Returns:
        A float64 array of shape `[K, K]`.

    Raises:
        ValueError: for an unknown noise type, a rate outside `[0, 1)`, or
            `asym` on a dataset other than CIFAR-10/100.
    """
    _check_noise_args(noise_type, rate, num_classes, dataset)
    k = num_classes
    if noise_type == "none":
        return np.eye(k)
    if noise_type == "sym":
        matrix = np.full((k, k), rate / (k - 1))
        np.fill_diagonal(matrix, 1.0 - rate)
        return matrix
    if noise_type == "sym_inclusive":
        matrix = np.full((k, k), rate / k)
        np.fill_diagonal(matrix, 1.0 - rate + rate / k)
        return matrix
    if noise_type == "pairflip":
        matrix = (1.0 - rate) * np.eye(k)
        matrix[np.arange(k), (np.arange(k) + 1) % k] += rate
        return matrix
    return _asym_matrix(rate, k, dataset)


def _check_labels(labels, num_classes):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    if labels.size:
        low, high = labels.min(), labels.max()
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"labels must be in [0, {num_classes}), found label {bad}."
            )
    return labels.astype(np.int64)


def apply_label_noise(labels, noise_type, rate, num_classes, seed, dataset=None):
    """Corrupts clean labels with synthetic noise (paper §4.1.1).

    For `sym`, `pairflip` and `asym`, each sample's noisy label is drawn
    independently from row `labels[i]` of `transition_matrix(...)`, so the
    realised flip rate is close to, not exactly, `rate`. For `sym_inclusive`,
    exactly `round(rate * N)` samples, chosen without replacement, get a label
    redrawn uniformly over all `K` classes, their own included (DivideMix/ELR
    style; effective flip rate `rate * (K - 1) / K`).

    The result is a deterministic function of the arguments: the random numbers
    come from `np.random.default_rng(seed)`.

    Args:
        labels: 1-D integer array of clean labels in `[0, num_classes)`.
        noise_type: str. One of `NOISE_TYPES`.
        rate: float. The noise rate, in `[0, 1)`.
        num_classes: int. The number of classes `K`.
        seed: int. Seed of the noise draw.
        dataset: str or None. Required for `asym`: `"cifar10"` or `"cifar100"`.

    Returns:
        An int64 array of noisy labels, the same shape as `labels` (a copy,
        also when `noise_type="none"` or `rate=0`).

    Raises:
        ValueError: for invalid arguments or labels outside `[0, num_classes)`.
    """
    _check_noise_args(noise_type, rate, num_classes, dataset)
    labels = _check_labels(labels, num_classes)
    if noise_type == "none" or rate == 0:
        return labels.copy()
    rng = np.random.default_rng(seed)
    if noise_type == "sym_inclusive":
        noisy = labels.copy()
        num_redrawn = int(round(rate * labels.size))
        redrawn = rng.choice(labels.size, size=num_redrawn, replace=False)
        noisy[redrawn] = rng.integers(0, num_classes, size=num_redrawn)
        return noisy

    matrix = transition_matrix(noise_type, rate, num_classes, dataset)
    cumulative = np.cumsum(matrix, axis=1)
    # Normalise so each row ends at exactly 1.0: a uniform in [0, 1) then never
    # lands past the last class, and zero-probability classes are never chosen.
    cumulative /= cumulative[:, -1:]
    uniforms = rng.random(labels.size)
    # Group the samples by true class (one sort, no per-sample loop), then draw
    # each group from its row: the sampled class is the number of cumulative
    # bounds at or below the sample's uniform.
    order = np.argsort(labels, kind="stable")
    group_ends = np.searchsorted(labels[order], np.arange(num_classes + 1))
    noisy = np.empty_like(labels)
    for true_class in range(num_classes):
        members = order[group_ends[true_class] : group_ends[true_class + 1]]
        noisy[members] = np.searchsorted(
            cumulative[true_class], uniforms[members], side="right"
        )
    return noisy


def actual_noise_rate(clean, noisy):
    """Returns the realised noise rate: the fraction of labels that differ.

    Every run reports it next to the nominal rate (`noise_rate_actual` in
    `summary.json`): per-sample draws only approximate the nominal rate.

    Args:
        clean: array of clean labels.
        noisy: array of noisy labels, the same shape as `clean`.

    Returns:
        A Python float in `[0, 1]`; 0.0 for empty arrays.
    """
    clean = np.asarray(clean)
    noisy = np.asarray(noisy)
    if clean.shape != noisy.shape:
        raise ValueError(
            f"clean and noisy labels differ in shape: {clean.shape} vs {noisy.shape}."
        )
    if clean.size == 0:
        return 0.0
    return float(np.mean(clean != noisy))
