"""Calibration: served probabilities that say how often the prediction is right.

A network trained on noisy labels learns the noisy-label posterior
`p(ỹ | x) = Σ_i p(y = i | x) T[i, ỹ]`, not the clean one: under 50% symmetric
noise a perfectly accurate network's top probability is about 0.5. Its
probabilities then track how often each *noisy* label occurs, and plain
temperature scaling on held-out noisy labels reproduces exactly that.

Noise-corrected temperature scaling fits one temperature `t` so that the noisy
labels are best explained by the clean posterior `softmax(z / t)` passed through
the noise:

    p_noisy(x) = Tᵀ softmax(z(x) / t),   i.e.  p_noisy[j] = Σ_i p_clean[i] T[i, j],

where `T[i, j] = P(ỹ = j | y = i)`. `T` is known when the run made the noise
itself (`galkeras.noise.transition_matrix`) and estimated with cleanlab's
confident joint otherwise. The served probabilities are then
`softmax(z / t)`: the argmax (`class_id`) is unchanged, only the confidence
moves.

Measures on the clean test labels: the expected calibration error (ECE, 10
equal-width bins of the top-class probability) and the negative log-likelihood
(NLL). Everything up to `calibrate` is NumPy; `calibrate_method` and
`from_run` run a trained method's networks.
"""

import dataclasses
import math
import os
from typing import NamedTuple

import numpy as np

from galkeras import noise

# `--calibrate`: serve the network's own probabilities, or noise-corrected ones.
METHODS = ("none", "noise_corrected")
NUM_BINS = 10
# The largest 2-norm condition number of a usable `T`. With cond(T) = c, two
# clean posteriors can differ by up to c times more than the noisy posteriors
# they produce, so the noisy labels tell them apart only at ~c² times the
# samples; past 100 the fit says more about the sample than about `t`.
MAX_CONDITION = 100.0
# The temperatures searched: four decades around 1, which take a logit gap of
# 2 to anything from nearly one-hot to nearly uniform.
TEMPERATURE_BOUNDS = (1e-2, 1e2)
# The ratio high / low of t's 95% interval past which the summary says that t
# is loosely determined. On the Fashion-MNIST calibration benchmark at sym 50%
# (`benchmarks/calibration_sample_size.py`), fits on ~2,000 held-out labels
# (ratio ≈ 1.3) met ECE ≤ 0.05 in 90–100% of draws, fits on 300 (ratio ≈ 1.9)
# in about half to two thirds of them.
WIDE_INTERVAL = 1.5
# Confident learning counts per noisy class; with fewer it estimates nothing.
MIN_LABELS_PER_CLASS = 5
# Half the 95% quantile of χ² with one degree of freedom: the drop in total
# log-likelihood a 95% interval of one parameter allows (Wilks).
_CHI2_95_HALF = 1.920729
# The floor of a noisy-label probability in the likelihood: a label that `T`
# makes impossible under a confident prediction costs -log(1e-12) ≈ 27.6 nats
# instead of an infinite penalty that one sample would decide the fit with.
_PROBABILITY_FLOOR = 1e-12


def softmax(logits, temperature=1.0):
    """float64 `softmax(logits / temperature)` over the last axis."""
    return np.exp(log_softmax(logits, temperature))


def log_softmax(logits, temperature=1.0):
    """float64 `log softmax(logits / temperature)` over the last axis."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class Reliability:
    """A reliability diagram's bins: bin `m` holds the samples whose top-class
    probability lies in `(m / M, (m + 1) / M]` (the first bin also holds 0).

    Attributes:
        count: int `[M]`, samples per bin.
        confidence: float `[M]`, their mean top-class probability (NaN if empty).
        accuracy: float `[M]`, the share whose top class is the label (NaN if
            empty).
    """

    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self):
        """Σ_m |B_m| / N · |accuracy(B_m) − confidence(B_m)| over non-empty bins."""
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(self.count[filled] * gaps) / max(self.count.sum(), 1))

    def as_dict(self):
        """JSON-ready lists; an empty bin's mean is None."""

        def listed(values):
            return [None if math.isnan(v) else float(v) for v in values]

        return {
            "count": [int(c) for c in self.count],
            "confidence": listed(self.confidence),
            "accuracy": listed(self.accuracy),
        }


def reliability(probabilities, labels, num_bins=NUM_BINS):
    """The `Reliability` bins of `probabilities` (`[N, K]`) against `labels`."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, None)
    bins = np.minimum(bins, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, confidence, num_bins) / count
        accuracy = np.bincount(bins, correct, num_bins) / count
    return Reliability(count, mean_confidence, accuracy)


def expected_calibration_error(probabilities, labels, num_bins=NUM_BINS):
    """ECE of `probabilities` against `labels` in `num_bins` equal-width bins of
    the top-class probability: `Σ_m |B_m| / N · |acc(B_m) − conf(B_m)|`."""
    return reliability(probabilities, labels, num_bins).ece


def negative_log_likelihood(logits, labels, temperature=1.0):
    """Mean `−log softmax(z / t)[y]` over samples (nats)."""
    labels = np.asarray(labels, np.int64)
    log_p = log_softmax(logits, temperature)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def measures(logits, labels, temperature=1.0, num_bins=NUM_BINS):
    """ECE, NLL, accuracy, mean top-class probability and the reliability bins
    of `softmax(logits / temperature)` against `labels`, as a JSON-ready dict."""
    p = softmax(logits, temperature)
    bins = reliability(p, labels, num_bins)
    return {
        "ece": bins.ece,
        "nll": negative_log_likelihood(logits, labels, temperature),
        "accuracy": float(np.mean(p.argmax(axis=1) == np.asarray(labels))),
        "mean_confidence": float(np.mean(p.max(axis=1))),
        "reliability": bins.as_dict(),
    }


# ------------------------------------------------------- transition matrices
def check_transition_matrix(matrix, num_classes=None, max_condition=MAX_CONDITION):
    """`matrix` as float64 `[K, K]` once it is a usable noise transition matrix.

    Raises:
        ValueError: naming the fault: not square (or not `num_classes` wide),
            not row-stochastic (a negative or non-finite entry, a row that does
            not sum to 1), or (nearly) singular, with a 2-norm condition number
            above `max_condition`: its rows are so alike (symmetric noise near
            the rate (K − 1) / K, pair or asymmetric flips near 50%) that the
            noisy labels cannot tell the clean classes apart.
    """
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"The transition matrix must be square [K, K]; got {m.shape}.")
    if num_classes is not None and m.shape[0] != num_classes:
        raise ValueError(
            f"The transition matrix is {m.shape[0]}x{m.shape[0]}, for "
            f"{num_classes} classes."
        )
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(
            "The transition matrix is not row-stochastic: it has a negative or "
            "non-finite entry."
        )
    sums = m.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
    if bad.size:
        raise ValueError(
            f"The transition matrix is not row-stochastic: row {bad[0]} sums to "
            f"{sums[bad[0]]:.6g}, not 1."
        )
    condition = np.linalg.cond(m)
    if not condition <= max_condition:
        raise ValueError(
            f"The transition matrix is (nearly) singular: condition number "
            f"{condition:.3g} > {max_condition:g}. Its rows are too alike for the "
            "noisy labels to tell the clean classes apart, so no temperature fit "
            "on them means anything."
        )
    return m


def known_transition_matrix(noise_type, noise_rate, num_classes, dataset=None):
    """The `T` of a synthetic noise the run made itself, exactly as
    `galkeras.noise.apply_label_noise` draws it (`sym` never flips to the true
    class; `sym_inclusive` gives its expected matrix); None for `none` and for
    a real-noise label set, whose `T` is unknown."""
    if noise_type not in noise.NOISE_TYPES or noise_type == "none":
        return None
    return noise.transition_matrix(noise_type, noise_rate, num_classes, dataset)


def estimate_transition_matrix(
    probabilities, noisy_labels, num_classes, min_labels=MIN_LABELS_PER_CLASS
):
    """`T` estimated by confident learning: cleanlab's `estimate_joint`
    `Q[ỹ, y] ≈ P(ỹ, y)` on `probabilities`, then `T[i, j] = Q[j, i] / Σ_k Q[k, i]`
    (cleanlab indexes [noisy, true]; `T` is [true, noisy]).

    Raises:
        ValueError: a class with fewer than `min_labels` noisy labels, a clean
            class that confident learning finds no sample of, or any failure of
            cleanlab's, named.
    """
    labels = np.asarray(noisy_labels, np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    short = np.flatnonzero(counts < min_labels)
    if short.size:
        raise ValueError(
            f"Cannot estimate the noise: class {short[0]} has {counts[short[0]]} "
            f"noisy labels among the {len(labels)} fit samples; confident learning "
            f"needs at least {min_labels} per class."
        )
    from cleanlab.count import estimate_joint

    p = np.asarray(probabilities, np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    try:
        joint = estimate_joint(labels, p)
    except Exception as error:
        # Whatever cleanlab raises, a finished run falls back rather than fails.
        raise ValueError(f"cleanlab could not estimate the noise ({error}).") from error
    mass = joint.sum(axis=0)
    empty = np.flatnonzero(~(mass > 0))
    if empty.size:
        raise ValueError(
            f"Cannot estimate the noise: confident learning finds no sample of "
            f"clean class {empty[0]}."
        )
    return (joint / mass).T


# ----------------------------------------------------------------- the fit
class TemperatureFit(NamedTuple):
    """`fit_temperature`'s result."""

    temperature: float
    # The mean noisy-label NLL at `temperature` (`noisy_label_nll`).
    noisy_nll: float
    # The search ended at an end of its range: the likelihood wanted further.
    at_bound: bool
    # `(low, high)`: the temperatures the noisy labels do not rule out, a 95%
    # profile-likelihood interval (`likelihood_interval`), clipped to the range.
    interval: tuple = (float("nan"), float("nan"))
    # The interval reaches an end of the range: the labels leave `t` open there.
    interval_open: bool = False


def noisy_label_nll(logits, noisy_labels, matrix, temperature):
    """Mean `−log (Tᵀ softmax(z / t))[ỹ]` over samples: how badly the clean
    posterior at temperature `t`, passed through the noise `T`, explains the
    noisy labels."""
    labels = np.asarray(noisy_labels, np.int64)
    p_clean = softmax(logits, temperature)
    # p_noisy[n, ỹ_n] = Σ_i p_clean[n, i] T[i, ỹ_n]
    p_label = np.einsum("ni,in->n", p_clean, matrix[:, labels])
    return float(-np.mean(np.log(np.maximum(p_label, _PROBABILITY_FLOOR))))


def fit_temperature(
    logits,
    noisy_labels,
    matrix,
    bounds=TEMPERATURE_BOUNDS,
    grid_points=41,
    tolerance=1e-4,
):
    """The temperature `t` that best explains the noisy labels through the noise.

    Maximum likelihood of the noisy labels `ỹ_n` under
    `p_noisy(x_n) = Tᵀ softmax(z_n / t)`:

        t* = argmin_t  −(1/N) Σ_n log Σ_i softmax(z_n / t)_i T[i, ỹ_n],

    searched over `u = log t` in `log bounds`: a grid of `grid_points`, then a
    golden-section search between the best grid point's neighbours, to a width
    of `tolerance` in `u` (a relative `tolerance` in `t`). With `T = I` this is
    plain temperature scaling.

    Args:
        logits: float `[N, K]`, finite.
        noisy_labels: int `[N]` in `[0, K)`.
        matrix: `T`, float `[K, K]`, `T[i, j] = P(ỹ = j | y = i)`.
        bounds: `(lowest, highest)` temperature searched, both > 0.

    Returns:
        A `TemperatureFit`.

    Raises:
        ValueError: bad shapes, non-finite logits, labels outside `[0, K)`, or
            a `T` that `check_transition_matrix` refuses.
    """
    z = np.asarray(logits, np.float64)
    labels = np.asarray(noisy_labels)
    if z.ndim != 2 or not len(z):
        raise ValueError(f"logits must be [N, K] with N >= 1; got shape {z.shape}.")
    if labels.shape != (len(z),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"noisy_labels must be {len(z)} integers; got {labels.dtype} "
            f"{labels.shape}."
        )
    if not np.all(np.isfinite(z)):
        raise ValueError("The logits hold non-finite values; nothing to fit.")
    if labels.min() < 0 or labels.max() >= z.shape[1]:
        raise ValueError(f"noisy_labels must lie in [0, {z.shape[1]}).")
    matrix = check_transition_matrix(matrix, z.shape[1])
    low, high = (math.log(b) for b in bounds)

    def loss(u):
        return noisy_label_nll(z, labels, matrix, math.exp(u))

    grid = np.linspace(low, high, grid_points)
    values = np.array([loss(u) for u in grid])
    # Of equal grid minima (a likelihood flat to float precision), the mildest.
    best = min(np.flatnonzero(values == values.min()), key=lambda i: abs(grid[i]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, grid_points - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    u, value = (c, fc) if fc < fd else (d, fd)
    if values[best] < value:
        u, value = grid[best], values[best]
    at_bound = min(u - low, high - u) < 2 * tolerance
    (u_low, u_high), is_open = likelihood_interval(
        loss, grid, values, u, value, len(z), tolerance
    )
    return TemperatureFit(
        math.exp(u),
        float(value),
        bool(at_bound),
        (math.exp(u_low), math.exp(u_high)),
        is_open,
    )


def likelihood_interval(loss, grid, values, best_u, best_value, samples, tolerance):
    """The 95% profile-likelihood interval of `u = log t`: the connected range
    around the maximum-likelihood `best_u` where the total noisy-label
    log-likelihood lies within χ²₁(0.95) / 2 = 1.92 of its maximum, i.e.

        N · (loss(u) − loss(best_u)) ≤ 1.92,

    `loss` the mean noisy-label NLL, `values` its values on `grid`. Walking out
    from `best_u` along the grid, each end is found by bisection between the
    last point inside and the first outside, to `tolerance`.

    Returns:
        `((u_low, u_high), open)`: `open` when an end is the grid's own (the
        labels do not rule out the range's end).
    """
    limit = best_value + _CHI2_95_HALF / samples
    below, above = np.flatnonzero(grid < best_u), np.flatnonzero(grid > best_u)
    ends, is_open = [], False
    for side in (below[::-1], above):
        a, b = best_u, None  # the last point inside, the first outside
        for i in side:
            if values[i] > limit:
                b = grid[i]
                break
            a = grid[i]
        if b is None:  # inside up to the grid's end
            ends.append(float(a))
            is_open = True
            continue
        while abs(b - a) > tolerance:
            middle = (a + b) / 2
            a, b = (middle, b) if loss(middle) <= limit else (a, middle)
        ends.append(float(a))
    return (ends[0], ends[1]), is_open


# ------------------------------------------------------------- calibrating
@dataclasses.dataclass
class Calibration:
    """What `calibrate` served, and why.

    Attributes:
        method: `"noise_corrected"`, or `"none"` (asked for, or fallen back to).
        temperature: `t` of the served `softmax(z / t)`; 1.0 for `none`.
        transition: where `T` came from: `"known"` (the run's synthetic noise)
            or `"estimated"` (cleanlab); None for `none`.
        fitted_on: `"heldout"` (the noisy held-out split) or `"training_set"`.
        fit_samples: how many samples the fit saw.
        at_bound: the fit ended at an end of `TEMPERATURE_BOUNDS`.
        interval: `[low, high]`, the 95% likelihood interval of `t`
            (`likelihood_interval`); None for `none`.
        fallback: why `noise_corrected` fell back to `none`; None otherwise.
        matrix: the `T` used (None for `none`).
    """

    method: str
    temperature: float = 1.0
    transition: str | None = None
    fitted_on: str | None = None
    fit_samples: int = 0
    at_bound: bool = False
    interval: list | None = None
    fallback: str | None = None
    matrix: np.ndarray | None = None

    def as_dict(self):
        """The JSON-ready fields (all but `matrix`)."""
        entry = dataclasses.asdict(self)
        del entry["matrix"]
        return entry


def calibrate(
    logits,
    noisy_labels,
    noise_type,
    noise_rate,
    dataset=None,
    fitted_on="heldout",
    method="noise_corrected",
):
    """The served temperature for `method`, fitted on `logits` and their noisy
    labels (`fitted_on` names where they come from).

    `T` is `known_transition_matrix(...)` when the run made the noise itself,
    else estimated (`estimate_transition_matrix`) on the same samples'
    probabilities. Where `T` can be neither known nor estimated, the fit
    refuses it, or the noisy labels leave `t` undetermined (its 95% likelihood
    interval reaches an end of `TEMPERATURE_BOUNDS`: too few samples, or noise
    so heavy that the labels say little), this falls back to `none` with a
    warning naming the reason: it never fails a finished run.

    Raises:
        ValueError: an unknown `method`.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown calibration {method!r}; choose one of {METHODS}.")
    if method == "none":
        return Calibration("none")
    z = np.asarray(logits, np.float64)
    samples = len(z)
    try:
        num_classes = z.shape[1] if z.ndim == 2 else 0
        matrix = known_transition_matrix(noise_type, noise_rate, num_classes, dataset)
        transition = "known"
        if matrix is None:
            transition = "estimated"
            if not samples or not np.all(np.isfinite(z)):
                raise ValueError("No samples with finite logits to estimate T on.")
            matrix = estimate_transition_matrix(softmax(z), noisy_labels, num_classes)
        fit = fit_temperature(z, noisy_labels, matrix)
        if fit.interval_open:
            low, high = fit.interval
            raise ValueError(
                f"the {samples} noisy labels ({fitted_on}) do not determine the "
                f"temperature: their 95% likelihood interval [{low:.3g}, "
                f"{high:.3g}] reaches the end of the search range "
                f"{TEMPERATURE_BOUNDS}. Hold out more samples "
                "(--noisy_validation_split) for a fit."
            )
    except ValueError as error:
        from absl import logging

        reason = str(error)
        logging.warning(
            "--calibrate=noise_corrected falls back to none (uncalibrated "
            "probabilities are served): %s",
            reason,
        )
        return Calibration("none", fitted_on=fitted_on, fallback=reason)
    return Calibration(
        method,
        temperature=fit.temperature,
        transition=transition,
        fitted_on=fitted_on,
        fit_samples=samples,
        at_bound=fit.at_bound,
        interval=[float(v) for v in fit.interval],
        matrix=matrix,
    )


# ------------------------------------------------------------ trained runs
def fit_network(
    method,
    network,
    images,
    noisy_labels,
    noise_type="none",
    noise_rate=0.0,
    dataset=None,
    fitted_on="heldout",
    calibration="noise_corrected",
    batch_size=256,
):
    """The temperature to serve `method`'s network `network` with, fitted
    (`calibrate`) on its logits of `images` against their `noisy_labels`: what
    a run does after training, for a method trained in Python
    (`export.export_classifier(net, path, temperature=result.temperature)`).

    Args:
        method: a trained `GAL` or `NoisyLabelMethod`.
        network: the name of the network to serve (GAL: `"student"`).
        images: uint8 `[N, H, W, C]` or `ImageFiles`: a noisy held-out split
            the method did not train on, or its training set (`fitted_on=
            "training_set"`, in sample).
        noisy_labels: int `[N]`, their noisy labels.
        noise_type, noise_rate, dataset: the synthetic noise, when the labels
            were made with `galkeras.noise` (T known); `"none"` estimates T.

    Returns:
        A `Calibration`.
    """
    from galkeras.label_issues import network_logits

    logits = network_logits(method, [network], images, batch_size)[network]
    return calibrate(
        logits,
        np.asarray(noisy_labels),
        noise_type,
        noise_rate,
        dataset=dataset,
        fitted_on=fitted_on,
        method=calibration,
    )


def calibrate_method(
    method,
    networks,
    reported,
    data,
    noisy,
    heldout_ids=(),
    calibration="noise_corrected",
    noise_type="none",
    noise_rate=0.0,
    batch_size=256,
):
    """Measures a trained method's networks on the clean test split, and fits
    the temperature its reported network is served with.

    Every network in `networks` is run once on `data.x_test` (inference mode)
    and measured against `data.y_test` (`measures`). The temperature is fitted
    (`calibrate`) on `reported`'s logits of the noisy held-out split when
    `heldout_ids` is not empty, else of the whole training set, against their
    noisy labels.

    Args:
        method: a trained `GAL` or `NoisyLabelMethod`.
        networks: names of its networks to measure (`joint` included).
        reported: the served network's name.
        data: the run's `Dataset`.
        noisy: int `[N]`, the noisy training labels.
        heldout_ids: the `--noisy_validation_split` samples.
        calibration: one of `METHODS`.
        noise_type, noise_rate: the run's `--noise_type` and `--noise_rate`.

    Returns:
        `(Calibration, entry)`: `entry` is `summary.json`'s `calibration`:
        `networks` (each network's measures at temperature 1), `served` (the
        reported network's `Calibration` fields and its measures at the served
        temperature), `test_examples` and `bins`.
    """
    from galkeras.label_issues import network_logits

    y_test = np.asarray(data.y_test)
    networks = list(networks)
    measured = networks + ([reported] if reported not in networks else [])
    test = network_logits(method, measured, data.x_test, batch_size)
    heldout_ids = np.asarray(heldout_ids, np.int64)
    fitted_on = "heldout" if len(heldout_ids) else "training_set"
    result = Calibration("none")
    if calibration != "none":
        images, labels = data.x_train, np.asarray(noisy)
        if len(heldout_ids):
            labels = labels[heldout_ids]
            images = (
                images.subset(heldout_ids)
                if hasattr(images, "subset")
                else images[heldout_ids]
            )
        result = fit_network(
            method,
            reported,
            images,
            labels,
            noise_type,
            noise_rate,
            dataset=data.name,
            fitted_on=fitted_on,
            calibration=calibration,
            batch_size=batch_size,
        )
    entry = {
        "test_examples": len(y_test),
        "bins": NUM_BINS,
        "networks": {net: measures(test[net], y_test) for net in networks},
        "served": {
            "network": reported,
            **result.as_dict(),
            **measures(test[reported], y_test, result.temperature),
        },
    }
    return result, entry


def from_run(model_dir, calibration="noise_corrected"):
    """A finished run's calibration, recomputed from its last checkpoint
    without training: what `galkeras.train` serves and measures, for a
    benchmark or a run made before calibration existed.

    Args:
        model_dir: the run directory of a finished `galkeras.train` run.
        calibration: one of `METHODS`.

    Returns:
        `(Calibration, entry)` as `calibrate_method` returns them; nothing is
        written.

    Raises:
        galkeras.label_issues.RunProblem: no finished run there, or data or a
            checkpoint that no longer match it.
        ValueError: an unknown `calibration`.
    """
    import json

    from galkeras import label_issues, train

    if calibration not in METHODS:
        raise ValueError(
            f"Unknown calibration {calibration!r}; choose one of {METHODS}."
        )
    problems = label_issues.finished_run_problems(model_dir)
    if problems:
        raise label_issues.RunProblem("\n".join(problems))
    config = dataclasses.replace(train.config_of_run(model_dir), model_dir=model_dir)
    with open(os.path.join(model_dir, "summary.json")) as f:
        reported = json.load(f).get("reported_network")
    with label_issues.restored_run(config) as (method, loaded):
        return calibrate_method(
            method,
            train.LABEL_ISSUE_NETWORKS[config.method],
            reported or train.reported_network(config),
            loaded.data,
            loaded.noisy,
            heldout_ids=(
                () if len(loaded.train_ids) == len(loaded.noisy) else loaded.heldout_ids
            ),
            calibration=calibration,
            noise_type=config.noise_type,
            noise_rate=config.noise_rate,
            batch_size=max(config.batch_size, 256),
        )
