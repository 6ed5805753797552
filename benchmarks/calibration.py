"""Are the served probabilities calibrated? ECE before and after the noise-corrected
temperature, for each method's reported network, against the clean test labels.

Settings: the memorisation benchmark's reduced Fashion-MNIST regimes
(`after_drop`, `in_warmup`) and noises (sym 50%, sym 80%, pairflip 45%), and
`digits` at sym 50% with the quickstart's flags. Every method the CLI trains
(`gal`, `ce`, `coteaching`, `coteaching_plus`, `jocor`) runs once (seed 0) with a
noisy held-out split (`--heldout`, default 10%: `--noisy_validation_split=0.1`),
on which the run fits its temperature (`--calibrate=noise_corrected`, the
default, with T known from the synthetic noise). Each run's `summary.json`
holds both measures: `calibration.networks[<reported>]` (uncalibrated) and
`calibration.served`.

Runs are normal `python -m galkeras.train` runs under `--out/runs` (not
committed), so the benchmark is resumable and runs by parts (`--settings`);
`results.json` keeps the settings it already holds.

Usage:

    python benchmarks/calibration.py --out=benchmarks/results/calibration --jobs=2
    # the same runs' calibration recomputed by today's code, without training:
    python benchmarks/calibration.py --out=benchmarks/results/calibration \
        --recalibrate
    # a larger held-out split, for the fit's sample size:
    python benchmarks/calibration.py --heldout=0.3 \
        --settings=after_drop_sym50,in_warmup_sym50,digits_sym50 \
        --out=benchmarks/results/calibration_heldout30
    # 2,000 held-out labels beside the regimes' 1,000 training images, and the
    # ECE measured on the whole 10,000-image test split:
    python benchmarks/calibration.py --heldout_images=2000 --num_test=10000 \
        --settings=after_drop_sym50,in_warmup_sym50 \
        --out=benchmarks/results/calibration_fit2000
"""

import dataclasses
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import label_issues as label_issue_benchmark  # noqa: E402
import memorisation  # noqa: E402

METHODS = ("gal", "ce", "coteaching", "coteaching_plus", "jocor")
DIGITS = "digits_sym50"


def settings_of(regimes, noises):
    """Setting names: `<regime>_<noise>` and `digits_sym50`."""
    return [f"{r}_{n}" for r in regimes for n in noises] + [DIGITS]


def method_values(setting, method, subsets, seed):
    """The flags of `method` in `setting`."""
    if setting == DIGITS:
        values = {
            "flagfile": os.path.join(memorisation.ROOT, "flags", "quickstart.flags"),
            "verbose": 0,
            "seed": seed,
            "noisy_validation_split": FLAGS.heldout,
        }
        if method != "gal":
            values["method"] = method
        if method == "coteaching_plus":
            values["init_epoch"] = 12  # the quickstart's warm-up
        return values
    regime_name, noise = setting.rsplit("_", 1)
    regime = memorisation.REGIMES[regime_name]
    values = label_issue_benchmark.method_values(
        method, regime, noise, seed, f"npz:{subsets[regime_name]}"
    )
    values["noisy_validation_split"] = heldout_share(regime)
    return values


def heldout_share(regime):
    """`--noisy_validation_split` of a Fashion-MNIST setting: `--heldout`, or with
    `--heldout_images` the share that holds out that many images of a subset
    grown by them, so that training keeps the regime's own images."""
    if not FLAGS.heldout_images:
        return FLAGS.heldout
    return FLAGS.heldout_images / (regime.num_train + FLAGS.heldout_images)


def subset_regime(regime):
    """The regime whose subset a setting trains on: grown by `--heldout_images`,
    with `--num_test` test images."""
    return dataclasses.replace(
        regime,
        num_train=regime.num_train + FLAGS.heldout_images,
        num_test=FLAGS.num_test or regime.num_test,
    )


def collect(setting_dir, recalibrate=False):
    """`{method: measures}` of a setting's finished runs: as each run's
    `summary.json` recorded them, or with `recalibrate` recomputed from its
    checkpoint by today's code (`galkeras.calibration.from_run`)."""
    from galkeras import calibration as calibration_module

    results = {}
    for method in METHODS:
        run = os.path.join(setting_dir, method, "run")
        path = os.path.join(run, "summary.json")
        if not os.path.exists(path):
            continue
        if recalibrate:
            _, calibration = calibration_module.from_run(run)
        else:
            with open(path) as f:
                calibration = json.load(f)["calibration"]
        served = calibration["served"]
        before = calibration["networks"][served["network"]]
        results[method] = {
            "network": served["network"],
            "accuracy": before["accuracy"],
            "ece_before": before["ece"],
            "ece_after": served["ece"],
            "nll_before": before["nll"],
            "nll_after": served["nll"],
            "temperature": served.get("temperature"),
            "interval": served.get("interval"),
            "transition": served.get("transition"),
            "fitted_on": served.get("fitted_on"),
            "fit_samples": served.get("fit_samples"),
            "fallback": served.get("fallback"),
        }
    return results


def markdown(results):
    lines = [
        "ECE before → after (10 bins, clean test labels), NLL before → after, "
        "the temperature t with its 95% likelihood interval, and the held-out "
        "labels it was fitted on, of each method's reported network.",
        "",
        "| setting | method | accuracy | ECE | NLL | t (95% interval) | fit on |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, methods in results.items():
        for method, r in methods.items():
            t, interval = r["temperature"], r.get("interval")
            if r.get("fallback"):
                served = "none: " + r["fallback"].split(":")[0]
            elif interval:
                served = f"{t:.3f} ({interval[0]:.2f}–{interval[1]:.2f})"
            else:
                served = "–" if t is None else f"{t:.3f}"
            lines.append(
                f"| {setting} | {method} ({r['network']}) | "
                f"{100 * r['accuracy']:.1f} | "
                f"{r['ece_before']:.3f} → {r['ece_after']:.3f} | "
                f"{r['nll_before']:.3f} → {r['nll_after']:.3f} | {served} | "
                f"{r.get('fit_samples') or '–'} |"
            )
    return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags."""
    flags.DEFINE_string("out", "benchmarks/results/calibration", "Output directory.")
    flags.DEFINE_string("npz", memorisation.DEFAULT_NPZ, "Dataset npz.")
    flags.DEFINE_list(
        "settings",
        settings_of(memorisation.REGIMES, memorisation.NOISES),
        "Subset of the settings.",
    )
    flags.DEFINE_list("methods", list(METHODS), f"Subset of {METHODS}.")
    flags.DEFINE_integer("seed", 0, "Seed of weights, batches and noise.")
    flags.DEFINE_integer("jobs", 2, "Trainings run at once, each on one thread.")
    flags.DEFINE_float(
        "heldout", 0.1, "--noisy_validation_split of every run: the fit's labels."
    )
    flags.DEFINE_integer(
        "heldout_images",
        0,
        "Fashion-MNIST settings: hold out this many images besides the regime's "
        "training images (the subset grows by them; training keeps the regime's "
        "count); 0: --heldout of the regime's images.",
    )
    flags.DEFINE_integer(
        "num_test",
        0,
        "Fashion-MNIST settings: test images the ECE is measured on (0: the "
        "regime's; 10000: the whole test split).",
    )
    flags.DEFINE_bool(
        "recalibrate",
        False,
        "Recompute each finished run's calibration from its checkpoint with "
        "today's code instead of reading its summary.json.",
    )


def main(argv):
    del argv
    known = settings_of(memorisation.REGIMES, memorisation.NOISES)
    problems = [f"--settings: unknown {s!r}" for s in FLAGS.settings if s not in known]
    problems += [f"--methods: unknown {m!r}" for m in FLAGS.methods if m not in METHODS]
    problems += [
        f"--{name}={getattr(FLAGS, name)} must be >= 0"
        for name in ("heldout_images", "num_test")
        if getattr(FLAGS, name) < 0
    ]
    if problems:
        sys.exit("calibration: " + "; ".join(problems))
    runs = os.path.join(FLAGS.out, "runs")
    os.makedirs(runs, exist_ok=True)
    subsets = {}
    for name, regime in memorisation.REGIMES.items():
        if any(s.startswith(f"{name}_") for s in FLAGS.settings):
            grown = subset_regime(regime)
            suffix = (
                f"_train{grown.num_train}_test{grown.num_test}"
                if grown != regime
                else ""
            )
            subsets[name] = os.path.join(runs, f"{name}{suffix}.npz")
            if not os.path.exists(subsets[name]):
                memorisation.make_subset(FLAGS.npz, grown, subsets[name])
    trainings = [
        label_issue_benchmark.Training(
            os.path.join(runs, setting, method),
            method_values(setting, method, subsets, FLAGS.seed),
        )
        for setting in FLAGS.settings
        for method in FLAGS.methods
    ]
    label_issue_benchmark.run_trainings(trainings, FLAGS.jobs, print)
    results_path = os.path.join(FLAGS.out, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)["results"]
    for setting in FLAGS.settings:
        results[setting] = collect(os.path.join(runs, setting), FLAGS.recalibrate)
    results = {s: results[s] for s in known if s in results}
    with open(results_path, "w") as f:
        json.dump(
            {
                "seed": FLAGS.seed,
                "heldout": FLAGS.heldout,
                "heldout_images": FLAGS.heldout_images,
                "num_test": FLAGS.num_test,
                # Recomputed from the runs' checkpoints by the code of this commit.
                "recalibrated": FLAGS.recalibrate,
                "results": results,
            },
            f,
            indent=1,
        )
    with open(os.path.join(FLAGS.out, "table.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
