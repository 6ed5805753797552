"""How many noisy held-out labels does the noise-corrected temperature need?

For each finished run of `benchmarks/calibration.py` under `--runs`, the
reported network's logits of the run's clean test split are split in two
halves. `n` images of the first half get noisy labels drawn through the run's
own noise `T` (as `galkeras.noise` makes them), the temperature is fitted on
them (`galkeras.calibration.fit_temperature`, T known) and the ECE is measured
on the second half against the clean labels. Repeated `--draws` times (a new
split each time) for each `n` of `--sample_sizes`, it reports the share of
draws whose ECE is at most `--target`, and the median and 90th-percentile ECE.
Beside them: the lowest ECE any single temperature reaches on the whole test
split (selected on the test labels: a bound, not a result) and the run's own
fit on its held-out split.

The fit and the measure are separated: the fit sees only noisy labels, as a
practitioner's would; the ECE is measured on 5,000 images, so its own error
(about ±0.01) does not hide the fit's.

Usage (after `calibration.py --heldout_images=2000 --num_test=10000`):

    python benchmarks/calibration_sample_size.py \\
        --runs=benchmarks/results/calibration_fit2000/seed0/runs \\
        --out=benchmarks/results/calibration_fit2000/seed0
"""

import json
import os
import sys

import numpy as np
from absl import app, flags


def sample_size_curve(logits, labels, noise, sizes, draws, target, seed=0):
    """`{n: (share of draws with ECE ≤ target, median ECE, 90th-percentile ECE)}`
    of a temperature fitted on `n` noisy labels of one half of `logits` and
    measured on the other half against the clean `labels`.

    Args:
        noise: `(noise_type, noise_rate, dataset)` of `galkeras.noise`: the
            noisy labels are drawn by `apply_label_noise` and T is its
            `transition_matrix`.
    """
    from galkeras import calibration
    from galkeras.noise import apply_label_noise, transition_matrix

    noise_type, noise_rate, dataset = noise
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    num_classes = logits.shape[1]
    matrix = transition_matrix(noise_type, noise_rate, num_classes, dataset)
    rng = np.random.default_rng(seed)
    half = len(labels) // 2
    curve = {}
    for n in sizes:
        if n > half:
            continue
        errors = []
        for _ in range(draws):
            order = rng.permutation(len(labels))
            fit_ids, measure_ids = order[:n], order[half:]
            noisy = apply_label_noise(
                labels[fit_ids],
                noise_type,
                noise_rate,
                num_classes,
                seed=int(rng.integers(2**31)),
                dataset=dataset,
            )
            t = calibration.fit_temperature(
                logits[fit_ids], noisy, matrix, grid_points=21
            ).temperature
            probabilities = calibration.softmax(logits[measure_ids], t)
            errors.append(
                calibration.expected_calibration_error(
                    probabilities, labels[measure_ids]
                )
            )
        errors = np.array(errors)
        curve[n] = (
            float(np.mean(errors <= target)),
            float(np.median(errors)),
            float(np.percentile(errors, 90)),
        )
    return curve


def best_single_temperature(logits, labels):
    """`(lowest ECE, its t)` over a log grid of temperatures (test-selected)."""
    from galkeras import calibration

    grid = np.exp(np.linspace(np.log(0.05), np.log(5.0), 161))
    errors = [
        calibration.expected_calibration_error(calibration.softmax(logits, t), labels)
        for t in grid
    ]
    best = int(np.argmin(errors))
    return float(errors[best]), float(grid[best])


def estimated_transition_fit(held_logits, noisy_held, test_logits, labels):
    """`(ECE, t, Calibration)` of the fit on the held-out split with T estimated
    by confident learning (`calibrate` with `noise_type="none"`), as a run on
    data whose noise galkeras did not make would fit it; ECE on the test split
    (NaN where the fit fell back)."""
    from galkeras import calibration

    result = calibration.calibrate(held_logits, noisy_held, "none", 0.0)
    if result.method == "none":
        return float("nan"), None, result
    probabilities = calibration.softmax(test_logits, result.temperature)
    ece = calibration.expected_calibration_error(probabilities, labels)
    return float(ece), result.temperature, result


def run_logits(run):
    """`(reported network, its test logits, clean test labels, noise, summary,
    (held-out logits, their noisy labels))` of a finished run; `noise` as
    `sample_size_curve` takes it."""
    import dataclasses

    from galkeras import label_issues, train

    config = dataclasses.replace(train.config_of_run(run), model_dir=run)
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    reported = summary["reported_network"]
    with label_issues.restored_run(config) as (method, loaded):
        logits = label_issues.network_logits(
            method, [reported], loaded.data.x_test, 256
        )[reported]
        ids = loaded.heldout_ids
        held = label_issues.network_logits(
            method, [reported], loaded.data.x_train[ids], 256
        )[reported]
        labels = np.asarray(loaded.data.y_test)
        noise = (config.noise_type, config.noise_rate, loaded.data.name)
    return reported, logits, labels, noise, summary, (held, loaded.noisy[ids])


FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags."""
    flags.DEFINE_string("runs", None, "A calibration benchmark's runs directory.")
    flags.DEFINE_string("out", None, "Where sample_size.json and .md go.")
    flags.DEFINE_list("sample_sizes", ["100", "300", "1000", "2000"], "Fit sizes n.")
    flags.DEFINE_integer("draws", 30, "Draws per fit size.")
    flags.DEFINE_float("target", 0.05, "The ECE counted as calibrated.")
    flags.DEFINE_list("methods", ["gal", "ce", "coteaching"], "Methods to analyse.")


def main(argv):
    del argv
    if not FLAGS.runs or not os.path.isdir(FLAGS.runs):
        sys.exit(f"calibration_sample_size: --runs={FLAGS.runs!r} is not a directory")
    sizes = [int(n) for n in FLAGS.sample_sizes]
    rows = []
    for setting in sorted(os.listdir(FLAGS.runs)):
        for method in FLAGS.methods:
            run = os.path.join(FLAGS.runs, setting, method, "run")
            if not os.path.exists(os.path.join(run, "summary.json")):
                continue
            reported, logits, labels, noise, summary, heldout = run_logits(run)
            best, best_t = best_single_temperature(logits, labels)
            estimated_ece, estimated_t, estimated = estimated_transition_fit(
                *heldout, logits, labels
            )
            curve = sample_size_curve(
                logits, labels, noise, sizes, FLAGS.draws, FLAGS.target
            )
            served = summary["calibration"]["served"]
            rows.append(
                {
                    "setting": setting,
                    "method": method,
                    "network": reported,
                    "test_images": len(labels),
                    "best_single_t_ece": best,
                    "best_single_t": best_t,
                    "run_fit": {
                        "samples": served.get("fit_samples"),
                        "temperature": served.get("temperature"),
                        "ece": served.get("ece"),
                    },
                    "estimated_transition": {
                        "ece": estimated_ece,
                        "temperature": estimated_t,
                        "fallback": estimated.fallback,
                    },
                    "curve": {str(n): c for n, c in curve.items()},
                }
            )
            print(rows[-1], flush=True)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "sample_size.json"), "w") as f:
        json.dump(
            {"draws": FLAGS.draws, "target": FLAGS.target, "rows": rows}, f, indent=1
        )
    lines = [
        f"Share of {FLAGS.draws} draws with test ECE ≤ {FLAGS.target} (median ECE) "
        "when t is fitted on n noisy labels drawn through T; best single t: the "
        "lowest ECE any temperature reaches on the test split (test-selected); "
        "the run's fit: its own on the held-out split, T known; T estimated: "
        "the same held-out split with T estimated by confident learning.",
        "",
        "| setting | network | best single t | run's fit | T estimated | "
        + " | ".join(f"n = {n}" for n in sizes)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(sizes),
    ]
    for r in rows:
        cells = [
            f"{r['curve'][str(n)][0]:.2f} ({r['curve'][str(n)][1]:.3f})"
            if str(n) in r["curve"]
            else "–"
            for n in sizes
        ]
        fit, estimated = r["run_fit"], r["estimated_transition"]
        lines.append(
            f"| {r['setting']} | {r['method']} ({r['network']}) | "
            f"{r['best_single_t_ece']:.3f} at {r['best_single_t']:.2f} | "
            f"{fit['ece']:.3f} at {fit['temperature'] or 1:.2f} "
            f"({fit['samples']} labels) | "
            + (
                f"{estimated['ece']:.3f} at {estimated['temperature']:.2f} | "
                if estimated["temperature"]
                else "fell back | "
            )
            + " | ".join(cells)
            + " |"
        )
    with open(os.path.join(FLAGS.out, "sample_size.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
