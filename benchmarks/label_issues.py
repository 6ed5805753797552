"""How well do a run's label issues find the flipped labels? Against cleanlab's recipe.

On the memorisation benchmark's reduced Fashion-MNIST regimes (`after_drop`,
`in_warmup`) and noises (sym 50%, sym 80%, pairflip 45%), where the flipped
labels are known, it scores every training label:

- with each method the CLI trains (`gal`, `ce`, `coteaching`, `coteaching_plus`,
  `jocor`), from the finished run's training-set probabilities
  (`galkeras.label_issues.from_run`): GAL's joint prediction and θC, CE's one
  network, the peers' joint prediction and net 1;
- with cleanlab's own recipe: out-of-fold probabilities of 5-fold cross-validated
  CE (`--method=ce` on 4/5 of the noisy set, predicting the other 1/5, folds
  stratified by noisy label), under the same schedule and network.

Each is scored by self-confidence (cleanlab's default label quality) and measured
by AUROC and AUPRC of the low-quality-first ranking against the true flips,
precision at k = the true number of flips (equal to recall at that k), and the
precision and recall of cleanlab's `find_label_issues` flags; beside the training
time each needs (5 folds for cleanlab). Every method trains on the whole noisy set
(no `--noisy_validation_split`), so every galkeras score is in-sample.

Runs are normal `python -m galkeras.train` runs under `--out/runs` (not
committed), so the benchmark is resumable and runs by parts (`--regimes`,
`--noises`); `results.json` keeps the settings it already holds. `--jobs`
trainings run at once, each on one thread.

Usage:

    python benchmarks/label_issues.py --out=benchmarks/results/label_issues --jobs=2
"""

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memorisation  # noqa: E402

ROOT = memorisation.ROOT
# Training methods and, per method, the networks whose probabilities are scored.
SCORED = {
    "gal": ("joint", "student"),
    "ce": ("net",),
    "coteaching": ("joint", "net1"),
    "coteaching_plus": ("joint", "net1"),
    "jocor": ("joint", "net1"),
}
CLEANLAB = "cleanlab_cv"
FOLDS = 5
QUICK_FOLDS = 2


@dataclasses.dataclass
class Training:
    """One `galkeras.train` run: its directory and flags."""

    run_dir: str
    values: dict

    @property
    def summary(self):
        return os.path.join(self.run_dir, "run", "summary.json")


def method_values(method, regime, noise, seed, dataset):
    """The flags of `method` in a setting: the memorisation benchmark's, with the
    whole noisy set trained on."""
    regime = dataclasses.replace(regime, noisy_validation_split=0.0)
    values = memorisation.shared_flags(regime, noise, seed, dataset)
    if method == "gal":
        return values
    values.update(method=method)
    values.pop("warmup_epochs")
    if method == "coteaching_plus":
        values["init_epoch"] = regime.warmup_epochs
    return values


def noisy_labels(subset, noise, seed):
    """`(images, noisy, clean, data)` of a subset as `galkeras.train` makes them."""
    from galkeras import train
    from galkeras.datasets import load_dataset

    noise_type, noise_rate = memorisation.NOISES[noise]
    config = train.TrainConfig(
        dataset=f"npz:{subset}",
        noise_type=noise_type,
        noise_rate=noise_rate,
        noise_seed=seed,
        seed=seed,
    )
    data = load_dataset(config.dataset)
    noisy, clean = train.training_labels(data, config)
    return noisy, clean, data


def folds_of(noisy, folds, seed):
    """`[(train ids, held-out ids)]`, stratified by noisy label, as cleanlab's
    `estimate_cv_predicted_probabilities` splits."""
    from sklearn.model_selection import StratifiedKFold

    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return list(split.split(np.zeros(len(noisy)), noisy))


def fold_trainings(setting_dir, regime, noise, seed, subset, folds):
    """The cross-validation trainings of one setting (their npz files made)."""
    noisy, clean, data = noisy_labels(subset, noise, seed)
    trainings = []
    for k, (train_ids, _) in enumerate(folds_of(noisy, folds, seed)):
        run_dir = os.path.join(setting_dir, f"{CLEANLAB}{k}")
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "fold.npz")
        if not os.path.exists(path):
            np.savez(
                path,
                x_train=data.x_train[train_ids],
                y_train=noisy[train_ids],
                y_train_clean=clean[train_ids],
                x_test=data.x_test,
                y_test=data.y_test,
            )
        values = method_values("ce", regime, noise, seed, f"npz:{path}")
        values.update(noise_type="none", noise_rate=0.0)
        trainings.append(Training(run_dir, values))
    return trainings


def run_trainings(trainings, parallel, log):
    """Runs the unfinished `trainings`, `parallel` at a time, one thread each."""
    pending = [t for t in trainings if not os.path.exists(t.summary)]
    running = []
    while pending or running:
        for training, proc, started in list(running):
            if proc.poll() is None:
                continue
            running.remove((training, proc, started))
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{training.run_dir} failed (exit {proc.returncode}); see "
                    f"{os.path.join(training.run_dir, 'train.log')}"
                )
            log(f"done {training.run_dir} in {time.time() - started:.0f} s")
        while pending and len(running) < parallel:
            training = pending.pop(0)
            values = dict(
                training.values,
                model_dir=os.path.join(training.run_dir, "run"),
                export_dir=os.path.join(training.run_dir, "export"),
            )
            flagfile = os.path.join(training.run_dir, "run.flags")
            os.makedirs(training.run_dir, exist_ok=True)
            with open(flagfile, "w") as f:
                f.write(memorisation.flag_lines(values))
            proc = memorisation.start_training(training.run_dir, flagfile)
            log(f"started {training.run_dir}")
            running.append((training, proc, time.time()))
        time.sleep(1)


def detection(quality, is_issue, flipped):
    """Detection quality of a label-quality ranking (low first) and of the
    issue flags, against the true flips."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    k = int(flipped.sum())
    top = np.lexsort((np.arange(len(quality)), quality))[:k]
    hits = int(flipped[top].sum())
    flagged = int(is_issue.sum())
    caught = int((is_issue & flipped).sum())
    return {
        "auroc": float(roc_auc_score(flipped, -quality)),
        "auprc": float(average_precision_score(flipped, -quality)),
        "precision_at_k": hits / k,
        "recall_at_k": hits / k,
        "issue_precision": caught / flagged if flagged else float("nan"),
        "issue_recall": caught / k,
        "issues": flagged,
        "flips": k,
    }


def _seconds(summary_path):
    with open(summary_path) as f:
        summary = json.load(f)
    return summary["seconds_per_epoch"] * summary["epochs"]


def score_setting(setting_dir, method_trainings, folds, noisy, clean, data, seed):
    """`{score name: detection + training seconds}` of one setting's runs."""
    import keras

    from galkeras import label_issues

    flipped = noisy != clean
    results = {}
    scratch = os.path.join(setting_dir, "scores")
    os.makedirs(scratch, exist_ok=True)
    for method, training in method_trainings.items():
        run_dir = os.path.join(training.run_dir, "run")
        with np.load(os.path.join(run_dir, "labels.npz")) as record:
            if not np.array_equal(record["noisy_labels"], noisy):
                raise RuntimeError(f"{run_dir} trained on other noisy labels.")
        for network in SCORED[method]:
            issues, _ = label_issues.from_run(
                run_dir,
                probabilities=network,
                out=os.path.join(scratch, f"{method}_{network}.csv"),
                overwrite=True,
            )
            results[f"{method}_{network}"] = {
                **detection(issues.quality, issues.is_issue, flipped),
                "train_seconds": _seconds(training.summary),
            }
    probabilities = np.zeros((len(noisy), data.num_classes), np.float32)
    seconds = 0.0
    for (_, held_ids), training in zip(folds_of(noisy, len(folds), seed), folds):
        seconds += _seconds(training.summary)
        net = keras.models.load_model(
            os.path.join(training.run_dir, "run", "net.keras")
        )
        logits = net.predict(data.x_train[held_ids].astype(np.float32), verbose=0)
        probabilities[held_ids] = keras.ops.convert_to_numpy(
            keras.ops.softmax(logits.astype(np.float32))
        )
    issues = label_issues.find_label_issues(probabilities, noisy)
    results[CLEANLAB] = {
        **detection(issues.quality, issues.is_issue, flipped),
        "train_seconds": seconds,
        "folds": len(folds),
    }
    return results


def markdown(results):
    """One table per regime: rows are scores, columns per noise."""
    lines = []
    for regime, noises in results.items():
        lines += [
            f"### {regime}",
            "",
            "AUROC / AUPRC / precision at k (k = the true flips) / issue "
            "precision / issue recall, and training minutes (one thread).",
            "",
        ]
        names = list(noises)
        lines.append("| score | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        scores = []
        for noise in names:
            scores += [s for s in noises[noise] if s not in scores]
        for score in scores:
            cells = []
            for noise in names:
                r = noises[noise].get(score)
                if r is None:
                    cells.append("–")
                    continue
                cells.append(
                    f"{r['auroc']:.3f} / {r['auprc']:.3f} / "
                    f"{r['precision_at_k']:.3f} / {r['issue_precision']:.3f} / "
                    f"{r['issue_recall']:.3f} · {r['train_seconds'] / 60:.1f} min"
                )
            lines.append(f"| {score} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags."""
    flags.DEFINE_string("out", "benchmarks/results/label_issues", "Output directory.")
    flags.DEFINE_string("npz", memorisation.DEFAULT_NPZ, "Dataset npz (Fashion-MNIST).")
    flags.DEFINE_list(
        "regimes", list(memorisation.REGIMES), "Subset of the memorisation regimes."
    )
    flags.DEFINE_list("noises", list(memorisation.NOISES), "Subset of the noises.")
    flags.DEFINE_integer("seed", 0, "Seed of weights, batches, noise and folds.")
    flags.DEFINE_list("methods", list(SCORED), f"Subset of {tuple(SCORED)}.")
    flags.DEFINE_integer("jobs", 2, "Trainings run at once, each on one thread.")
    flags.DEFINE_bool("quick", False, "A smoke version: tiny regime, CE, 2 folds.")


def main(argv):
    del argv
    if not os.path.exists(FLAGS.npz):
        sys.exit(f"label_issues: --npz={FLAGS.npz} does not exist.")
    regimes = memorisation.QUICK_REGIMES if FLAGS.quick else memorisation.REGIMES
    names = list(regimes) if FLAGS.quick else FLAGS.regimes
    noises = ["sym50"] if FLAGS.quick else FLAGS.noises
    methods = ["ce"] if FLAGS.quick else FLAGS.methods
    folds = QUICK_FOLDS if FLAGS.quick else FOLDS
    problems = [f"--regimes: unknown {r!r}" for r in names if r not in regimes]
    problems += [
        f"--noises: unknown {n!r}" for n in noises if n not in memorisation.NOISES
    ]
    problems += [f"--methods: unknown {m!r}" for m in methods if m not in SCORED]
    if problems:
        sys.exit("label_issues: " + "; ".join(problems))
    runs = os.path.join(FLAGS.out, "runs")
    os.makedirs(runs, exist_ok=True)
    plan = []
    for regime_name in names:
        regime = regimes[regime_name]
        subset = os.path.join(runs, f"{regime_name}.npz")
        if not os.path.exists(subset):
            memorisation.make_subset(FLAGS.npz, regime, subset)
        for noise in noises:
            setting_dir = os.path.join(runs, regime_name, noise, f"seed{FLAGS.seed}")
            trainings = {
                m: Training(
                    os.path.join(setting_dir, m),
                    method_values(m, regime, noise, FLAGS.seed, f"npz:{subset}"),
                )
                for m in methods
            }
            fold_runs = fold_trainings(
                setting_dir, regime, noise, FLAGS.seed, subset, folds
            )
            plan.append((regime_name, noise, setting_dir, subset, trainings, fold_runs))
    every = [
        t
        for *_, trainings, fold_runs in plan
        for t in [*trainings.values(), *fold_runs]
    ]
    run_trainings(every, FLAGS.jobs, print)

    results_path = os.path.join(FLAGS.out, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)["results"]
    for regime_name, noise, setting_dir, subset, trainings, fold_runs in plan:
        noisy, clean, data = noisy_labels(subset, noise, FLAGS.seed)
        scores = score_setting(
            setting_dir, trainings, fold_runs, noisy, clean, data, FLAGS.seed
        )
        results.setdefault(regime_name, {})[noise] = scores
        print(f"scored {regime_name} {noise}")
    settings = {n: dataclasses.asdict(r) for n, r in regimes.items() if n in results}
    with open(results_path, "w") as f:
        json.dump(
            {"regimes": settings, "seed": FLAGS.seed, "results": results}, f, indent=1
        )
    with open(os.path.join(FLAGS.out, "table.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
