"""Does gradient agreement itself stop memorisation? Controls, regimes, granularities.

On reduced-scale Fashion-MNIST settings, trains GAL at each agreement granularity
beside the controls that isolate what the gate does, with the same data, noisy
labels, seeds and schedule:

- `ce`: one network, cross entropy all along (`--method=ce`; its `selected` is
  early-stopped CE), with its fit of the training labels logged every epoch
  (`--train_fit`);
- `all`: θA + θB + CE, no gating (`update_rule=all`), θC distilled as in GAL;
- `stop`: stop and distil: τ = 1 at `variable` granularity freezes the twins at W,
  θC is trained as in GAL;
- `gal_variable`, `gal_channel`, `gal_element`: GAL, τ = 0.4, at each granularity;
- `random_variable`, `random_channel`, `random_element`: random updating at the
  same granularity, with p = the share of parameters that the matching GAL run's
  gate opened in phase 2 (same seed), so only *which* parameters update differs;
- `tau02_<g>`, `tau06_<g>`: τ = 0.2 and 0.6 at granularity g
  (`--sweep_granularity`, default `channel`).

Two regimes (`REGIMES`): `after_drop`, where CE's clean test accuracy still rises
at the first learning-rate drop W and falls after it as CE fits the noisy labels
(the paper's Table 1 shape), and `in_warmup`, where CE memorises during the
high-learning-rate warm-up, before agreement starts.

Every run is a normal `python -m galkeras.train` run in its own directory under
`--out/runs` (not committed: it holds checkpoints and the data subsets), so the
benchmark is resumable: finished runs are read back, unfinished
ones resume. `--regimes`, `--noises`, `--seeds` and `--methods` select a part;
`--jobs` runs that many trainings at once, each on one thread. Results go to
`results.json`, `table.md` and `curves.png` (needs matplotlib,
`pip install "galkeras[report]"`). `results.json` keeps the runs it already
holds whose directories are gone (a fresh clone has none), so a part re-run
in a clone replaces only its own runs there.

Usage:

    python benchmarks/memorisation.py --out=benchmarks/results/memorisation --jobs=2

`--quick` is a one-minute version that the test suite runs.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from galkeras.train import GRANULARITIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_NPZ = os.path.join(ROOT, "..", "shared", "data", "fashion_mnist.npz")

NOISES = {
    "sym50": ("sym", 0.5),
    "sym80": ("sym", 0.8),
    "pairflip45": ("pairflip", 0.45),
}
SWEEP_TAUS = (0.2, 0.6)
# The per-epoch curves that results.json keeps of each run.
HISTORY_KEPT = (
    "val_",
    "heldout_",
    "train_label_agreement",
    "train_noisy_",
    "train_clean_",
    "agreement",
    "pseudo_label_",
)


@dataclasses.dataclass(frozen=True)
class Regime:
    """One reduced-scale setting: data, capacity and schedule."""

    num_train: int
    num_test: int
    pool: int  # average-pool the 28x28 images by this factor
    backbone_width: int
    hidden_units: int
    epochs: int
    warmup_epochs: int  # ends at the first learning-rate drop, as in the paper
    lr_decay_epochs: tuple
    lr: float
    batch_size: int
    noisy_validation_split: float = 0.1
    subset_seed: int = 0


REGIMES = {
    # CE's clean test accuracy still rises at the first drop, peaks just after it
    # and falls as CE fits the noisy labels at the low learning rate.
    "after_drop": Regime(
        num_train=1000,
        num_test=1000,
        pool=2,
        backbone_width=48,
        hidden_units=0,
        epochs=40,
        warmup_epochs=15,
        lr_decay_epochs=(15, 35),
        lr=0.05,
        batch_size=32,
    ),
    # A wide dense layer on the flattened features, at a lower learning rate,
    # memorises during the warm-up, before agreement starts.
    "in_warmup": Regime(
        num_train=1000,
        num_test=1000,
        pool=2,
        backbone_width=16,
        hidden_units=128,
        epochs=40,
        warmup_epochs=15,
        lr_decay_epochs=(15, 35),
        lr=0.01,
        batch_size=32,
    ),
}

QUICK_REGIMES = {
    "quick": Regime(
        num_train=200,
        num_test=100,
        pool=2,
        backbone_width=8,
        hidden_units=0,
        epochs=4,
        warmup_epochs=2,
        lr_decay_epochs=(2, 3),
        lr=0.05,
        batch_size=32,
        noisy_validation_split=0.2,
    )
}
QUICK_METHODS = ("ce", "stop", "gal_element", "random_element")


# GAL's peers, each trained as `--method=<name>` under the same regime.
PEERS = ("coteaching", "coteaching_plus", "jocor")


def methods_for(sweep_granularity):
    """Every method name, in the order they run (a random control after its gate)."""
    names = ["ce", "all", "stop"]
    for g in GRANULARITIES:
        names += [f"gal_{g}", f"random_{g}"]
    names += [f"tau{round(t * 10):02d}_{sweep_granularity}" for t in SWEEP_TAUS]
    return names + list(PEERS)


def reported(method):
    """The network each method reports: θC where a student is trained, CE's one
    network for `ce`, and net 1 for a peer."""
    if method in PEERS:
        return "net1"
    return "net" if method == "ce" else "student"


def method_flags(method, runs_of_setting):
    """The flags that make `method` differ from the shared ones.

    `runs_of_setting` maps finished method names of the same regime, noise and seed
    to their summaries (the random controls take p from their gate's run)."""
    if method == "ce":
        # Its fit of the noisy training labels is the memorisation curve.
        return {"method": "ce", "warmup_epochs": DROP, "train_fit": True}
    if method in PEERS:
        # Their own defaults: forget rate = the noise rate, T_k = 10; Co-teaching+
        # disagrees from the first drop on, where GAL's agreement starts.
        values = {"method": method, "warmup_epochs": DROP}
        if method == "coteaching_plus":
            values["init_epoch"] = runs_of_setting.get("init_epoch", INIT_EPOCH)
        return values
    if method == "all":
        return {"update_rule": "all"}
    if method == "stop":
        return {"tau": 1.0, "agreement_granularity": "variable"}
    kind, _, granularity = method.partition("_")
    if kind == "gal":
        return {"agreement_granularity": granularity}
    if kind == "random":
        gate = runs_of_setting[f"gal_{granularity}"]
        return {
            "agreement_granularity": granularity,
            "update_rule": "random",
            "random_update_prob": round(gate["mean_agreement_param_ratio"], 6),
        }
    if kind.startswith("tau"):
        return {"agreement_granularity": granularity, "tau": int(kind[3:]) / 10}
    raise ValueError(f"unknown method {method!r}")


# A flag a method does not take (GAL's warm-up for a peer).
DROP = object()
INIT_EPOCH = None  # set per regime: its warm-up epochs


def make_subset(npz_path, regime, out_path):
    """A class-stratified subset of an npz dataset, pooled, for the `npz:` source."""
    import numpy as np

    with open(npz_path, "rb") as f:
        data = dict(np.load(f, allow_pickle=False))

    def take(labels, count):
        rng = np.random.default_rng(regime.subset_seed)
        classes = np.unique(labels)
        picks = [
            rng.permutation(np.flatnonzero(labels == c))[: count // len(classes)]
            for c in classes
        ]
        return np.sort(np.concatenate(picks))

    def pool(x):
        k = regime.pool
        n, h, w = x.shape[:3]
        x = x.astype(np.float32).reshape(n, h // k, k, w // k, k, *x.shape[3:])
        return np.round(x.mean(axis=(2, 4))).astype(np.uint8)

    train_idx = take(data["y_train"], regime.num_train)
    test_idx = take(data["y_test"], regime.num_test)
    np.savez(
        out_path,
        x_train=pool(data["x_train"][train_idx]),
        y_train=data["y_train"][train_idx],
        x_test=pool(data["x_test"][test_idx]),
        y_test=data["y_test"][test_idx],
    )
    return out_path


def shared_flags(regime, noise, seed, dataset):
    noise_type, noise_rate = NOISES[noise]
    return {
        "dataset": dataset,
        "noise_type": noise_type,
        "noise_rate": noise_rate,
        "noise_seed": seed,
        "seed": seed,
        "epochs": regime.epochs,
        "warmup_epochs": regime.warmup_epochs,
        "lr": regime.lr,
        "lr_decay_epochs": ",".join(str(e) for e in regime.lr_decay_epochs),
        "batch_size": regime.batch_size,
        "backbone_width": regime.backbone_width,
        "hidden_units": regime.hidden_units,
        "noisy_validation_split": regime.noisy_validation_split,
        "augment": "none",
        "verbose": 0,
        "log_every_steps": 16,
    }


def flag_lines(values):
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"--{key}" if value else f"--no{key}")
        else:
            lines.append(f"--{key}={value}")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Job:
    regime: str
    noise: str
    seed: int
    method: str
    run_dir: str

    @property
    def setting(self):
        return (self.regime, self.noise, self.seed)


def start_training(run_dir, flagfile):
    """Starts `python -m galkeras.train --flagfile=<flagfile>` on one thread,
    its output in `<run_dir>/train.log`; returns the `Popen`."""
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1")
    env.update(TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    with open(os.path.join(run_dir, "train.log"), "w") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "galkeras.train", f"--flagfile={flagfile}"],
            cwd=ROOT,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )


def run_jobs(jobs, out_dir, regimes, npz_path, parallel, log):
    """Runs the unfinished `jobs`, `parallel` at a time, each single-threaded,
    respecting that a random control waits for its gate's run."""
    subsets = {}
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    pending = [j for j in jobs if not os.path.exists(_summary_path(j))]
    # Gates first: a random control waits for its gate's run, which would
    # otherwise start last and leave its control to run alone after it.
    gates = {_gate_of(j).run_dir for j in pending if j.method.startswith("random_")}
    pending.sort(key=lambda j: j.run_dir not in gates)
    running = []
    while pending or running:
        for job, proc, started in list(running):
            if proc.poll() is not None:
                running.remove((job, proc, started))
                took = time.time() - started
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"{job.run_dir} failed (exit {proc.returncode}); see "
                        f"{os.path.join(job.run_dir, 'train.log')}"
                    )
                log(f"done {job.run_dir} in {took:.0f} s")
        ready = [
            j
            for j in pending
            if not j.method.startswith("random_")
            or os.path.exists(_summary_path(_gate_of(j)))
        ]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            pending.remove(job)
            regime = regimes[job.regime]
            if job.regime not in subsets:
                subsets[job.regime] = make_subset(
                    npz_path, regime, os.path.join(out_dir, "runs", f"{job.regime}.npz")
                )
            os.makedirs(job.run_dir, exist_ok=True)
            finished = _finished_runs(job)
            values = shared_flags(
                regime, job.noise, job.seed, f"npz:{subsets[job.regime]}"
            )
            if job.method == "coteaching_plus":
                finished = {**finished, "init_epoch": regime.warmup_epochs}
            values.update(method_flags(job.method, finished))
            values = {k: v for k, v in values.items() if v is not DROP}
            values["model_dir"] = os.path.join(job.run_dir, "run")
            values["export_dir"] = os.path.join(job.run_dir, "export")
            flagfile = os.path.join(job.run_dir, "run.flags")
            with open(flagfile, "w") as f:
                f.write(flag_lines(values))
            proc = start_training(job.run_dir, flagfile)
            log(f"started {job.run_dir}")
            running.append((job, proc, time.time()))
        if not ready and not running and pending:
            missing = sorted({_gate_of(j).run_dir for j in pending})
            raise RuntimeError(f"random controls need their gate runs: {missing}")
        time.sleep(1)


def _summary_path(job):
    return os.path.join(job.run_dir, "run", "summary.json")


def _gate_of(job):
    granularity = job.method.partition("_")[2]
    return dataclasses.replace(
        job,
        method=f"gal_{granularity}",
        run_dir=os.path.join(os.path.dirname(job.run_dir), f"gal_{granularity}"),
    )


def _finished_runs(job):
    setting_dir = os.path.dirname(job.run_dir)
    runs = {}
    for name in os.listdir(setting_dir):
        path = os.path.join(setting_dir, name, "run", "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)
    return runs


def _read_history(path):
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) if r[k] else float("nan") for r in rows] for k in rows[0]}


def collect(jobs):
    """results[regime][noise][method][seed] = summary with its history."""
    results = {}
    for job in jobs:
        path = _summary_path(job)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        history = _read_history(os.path.join(job.run_dir, "run", "history.csv"))
        summary["history"] = {
            k: [round(v, 5) for v in values]
            for k, values in history.items()
            if k == "epoch" or k.startswith(HISTORY_KEPT)
        }
        with open(os.path.join(job.run_dir, "run", "config.json")) as f:
            config = json.load(f)
        summary["updated_param_share"] = updated_share(summary, config)
        per_variable_csv = os.path.join(
            job.run_dir, "run", "agreement_per_variable.csv"
        )
        per_variable = (
            _read_history(per_variable_csv)
            if os.path.exists(per_variable_csv)
            else {"epoch": []}
        )
        phase2 = [
            i
            for i, e in enumerate(per_variable.pop("epoch"))
            if e >= summary["history"]["epoch"][0] + config["warmup_epochs"]
        ]
        summary["phase2_open_share_per_variable"] = {
            name: statistics.fmean(values[i] for i in phase2) if phase2 else None
            for name, values in per_variable.items()
        }
        by_method = results.setdefault(job.regime, {}).setdefault(job.noise, {})
        by_method.setdefault(job.method, {})[str(job.seed)] = summary
    return results


def merge_committed(results, path, settings):
    """`results` (the runs finished under `--out/runs`) over those already in
    `path`, a results.json, whose raw runs are not committed: a run found on
    disk replaces the stored one of the same regime, noise, method and seed.

    A stored regime whose setting differs from `settings` (`{regime: dict}`) is
    left out, and so is a stored run that reports another network than its
    method does now (`ce` before it was `--method=ce`: GAL's θA): both belong
    to an older benchmark."""
    if not os.path.exists(path):
        return results
    with open(path) as f:
        stored = json.load(f)
    current = json.loads(json.dumps(settings))
    merged = {}
    for regime, by_noise in stored["runs"].items():
        if stored["regimes"].get(regime) != current.get(regime):
            continue
        for noise, by_method in by_noise.items():
            for method, by_seed in by_method.items():
                for seed, summary in by_seed.items():
                    if summary.get("reported_network") != reported(method):
                        continue
                    merged.setdefault(regime, {}).setdefault(noise, {}).setdefault(
                        method, {}
                    )[seed] = summary
    for regime, by_noise in results.items():
        for noise, by_method in by_noise.items():
            for method, by_seed in by_method.items():
                merged.setdefault(regime, {}).setdefault(noise, {}).setdefault(
                    method, {}
                ).update(by_seed)
    return merged


def updated_share(summary, config):
    """The share of the twins' scalar parameters updated per phase-2 step: the
    τ-gate's open share under `agreement`, p under `random` (in expectation), and
    all of them under `all`. None for CE, which has no phase 2, and the peers."""
    if config.get("method", "gal") != "gal":
        return None
    if config["warmup_epochs"] >= config["epochs"]:
        return None
    if config["update_rule"] == "all":
        return 1.0
    if config["update_rule"] == "random":
        return config["random_update_prob"]
    return summary["mean_agreement_param_ratio"]


def layer_table(results):
    """Per regime: each variable's share of open scalars in phase 2, for each
    gate granularity (mean over noises and seeds): where the gates open."""
    out = []
    for regime, by_noise in results.items():
        gates = [f"gal_{g}" for g in GRANULARITIES]
        shares = {}
        for runs in by_noise.values():
            for gate in gates:
                for s in runs.get(gate, {}).values():
                    for name, v in s["phase2_open_share_per_variable"].items():
                        if v is not None:
                            shares.setdefault(name, {}).setdefault(gate, []).append(v)
        if not shares:
            continue
        out.append(f"### {regime}: share of each variable open in phase 2 (τ = 0.4)\n")
        out.append("| variable | " + " | ".join(gates) + " |")
        out.append("|---" * (len(gates) + 1) + "|")
        for name, by_gate in shares.items():
            cells = [
                f"{statistics.fmean(by_gate[g]):.3f}" if g in by_gate else "–"
                for g in gates
            ]
            out.append(f"| `{name}` | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def seed_values(runs, method, network, key):
    """`key` of `network` (percent) for each finished seed of `method`."""
    return [s[network][key] for s in runs.get(method, {}).values() if key in s[network]]


def mean_spread(values):
    """Mean and spread (max − min over seeds) of a list of values."""
    if not values:
        return None, None
    return statistics.fmean(values), max(values) - min(values)


def _cell(values):
    mean, spread = mean_spread(values)
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {spread / 2:.1f}" if len(values) > 1 else f"{mean:.1f}"


def markdown_tables(results, methods):
    """One table per regime and metric: rows are noises, columns are methods."""
    out = []
    metrics = (
        ("selected", "selected (noisy held-out)"),
        ("last", "last"),
        ("last10", "last 10 epochs"),
        ("best", "best (test-selected)"),
    )
    for regime, by_noise in results.items():
        present = [m for m in methods if any(m in r for r in by_noise.values())]
        for key, title in metrics:
            out.append(f"### {regime}: {title}, reported network\n")
            out.append("| noise | " + " | ".join(present) + " |")
            out.append("|---" * (len(present) + 1) + "|")
            for noise, runs in by_noise.items():
                cells = [_cell(seed_values(runs, m, reported(m), key)) for m in present]
                out.append(f"| {noise} | " + " | ".join(cells) + " |")
            out.append("")
        twins = [m for m in present if m != "ce"]
        for key in ("selected", "last"):
            out.append(f"### {regime}: {key}, the twins' joint prediction\n")
            out.append("| noise | " + " | ".join(twins) + " |")
            out.append("|---" * (len(twins) + 1) + "|")
            for noise, runs in by_noise.items():
                cells = [_cell(seed_values(runs, m, "joint", key)) for m in twins]
                out.append(f"| {noise} | " + " | ".join(cells) + " |")
            out.append("")
        out.append(f"### {regime}: share of the twins' parameters updated per step\n")
        gated = [m for m in present if m != "ce"]
        out.append("| noise | " + " | ".join(gated) + " |")
        out.append("|---" * (len(gated) + 1) + "|")
        for noise, runs in by_noise.items():
            cells = []
            for m in gated:
                values = [
                    s["updated_param_share"]
                    for s in runs.get(m, {}).values()
                    if s.get("updated_param_share") is not None
                ]
                cells.append(f"{statistics.fmean(values):.4f}" if values else "–")
            out.append(f"| {noise} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        "Cells: clean test accuracy in percent, mean ± half the range over seeds. "
        "The reported network is θC, CE's network for `ce` and net 1 for a peer. "
        "`best` picks the epoch on "
        "the test set (test-selected); `selected` picks it on the noisy held-out "
        "split, which a practitioner can do. The updated share is the τ-gate's "
        "open share of parameters in phase 2 (τ = 1 for `stop`), p for `random_*` "
        "(the matching gate's share), 1 for `all`."
    )
    return "\n".join(out) + "\n"


def verdicts(results):
    """For each regime, noise and gate: does it beat both early-stopped CE and stop
    and distil by more than the spread between seeds, on `selected` and `last`?

    The spread is the largest seed range (max − min) of the three methods, and
    the gate must lead each baseline's mean by more than it."""
    rows = []
    for regime, by_noise in results.items():
        for noise, runs in by_noise.items():
            for method in sorted(runs):
                if not method.startswith(("gal_", "tau")):
                    continue
                row = {"regime": regime, "noise": noise, "gate": method}
                for key in ("selected", "last"):
                    gate = seed_values(runs, method, "student", key)
                    ce = seed_values(runs, "ce", reported("ce"), "selected")
                    stop = seed_values(runs, "stop", "student", key)
                    if not (gate and ce and stop):
                        continue
                    means_spreads = [mean_spread(v) for v in (gate, ce, stop)]
                    spread = max(s for _, s in means_spreads)
                    (g_mean, _), (ce_mean, _), (stop_mean, _) = means_spreads
                    row[key] = {
                        "minus_early_stopped_ce": g_mean - ce_mean,
                        "minus_stop_and_distil": g_mean - stop_mean,
                        "spread": spread,
                        "beats_both": min(g_mean - ce_mean, g_mean - stop_mean)
                        > spread,
                    }
                rows.append(row)
    return rows


def verdict_table(rows):
    """`verdicts` as Markdown: the gate's lead over each baseline, in points."""
    lines = [
        "| regime | noise | gate | selected − early-stopped CE | selected − stop "
        "| last − early-stopped CE | last − stop | seed spread (selected / last) "
        "| beats both? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "selected" not in r or "last" not in r:
            continue
        s, last = r["selected"], r["last"]
        yes = ("selected" if s["beats_both"] else "") + (
            " last" if last["beats_both"] else ""
        )
        lines.append(
            f"| {r['regime']} | {r['noise']} | {r['gate']} "
            f"| {s['minus_early_stopped_ce']:+.1f} | {s['minus_stop_and_distil']:+.1f} "
            f"| {last['minus_early_stopped_ce']:+.1f} "
            f"| {last['minus_stop_and_distil']:+.1f} "
            f"| {s['spread']:.1f} / {last['spread']:.1f} | {yes.strip() or 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(results, methods, path):
    """Per regime two rows: CE's clean test accuracy, noisy held-out accuracy and
    fit of the noisy training labels; then θC's test accuracy for each method
    (first seed). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(results)
    noises = [n for n in NOISES if any(n in results[r] for r in regimes)]
    fig, axes = plt.subplots(
        2 * len(regimes),
        len(noises),
        figsize=(6 * len(noises), 4.2 * 2 * len(regimes)),
        squeeze=False,
    )
    for i, regime in enumerate(regimes):
        for j, noise in enumerate(noises):
            runs = results[regime].get(noise, {})
            top, bottom = axes[2 * i][j], axes[2 * i + 1][j]
            ce = reported("ce")
            for seed, s in sorted(runs.get("ce", {}).items()):
                h = s["history"]
                style = dict(lw=1.2 if seed == "0" else 0.6)
                top.plot(
                    [100 * a for a in h[f"val_{ce}_accuracy"]],
                    color="C0",
                    label=f"clean test accuracy (seed {seed})",
                    **style,
                )
                top.plot(
                    [100 * a for a in h[f"train_noisy_{ce}_accuracy"]],
                    color="C3",
                    label=f"fit of the noisy train labels (seed {seed})",
                    **style,
                )
                if f"heldout_{ce}_accuracy" in h:
                    top.plot(
                        [100 * a for a in h[f"heldout_{ce}_accuracy"]],
                        color="C2",
                        label=f"noisy held-out accuracy (seed {seed})",
                        **style,
                    )
            top.set(title=f"{regime}, {noise}: CE", xlabel="epoch", ylabel="%")
            for k, method in enumerate(m for m in methods if m in runs):
                first = runs[method][min(runs[method])]
                net = reported(method)
                bottom.plot(
                    [100 * a for a in first["history"][f"val_{net}_accuracy"]],
                    color=f"C{k % 10}",
                    lw=1.0,
                    label=method,
                )
            bottom.set(
                title=f"{regime}, {noise}: clean test accuracy "
                "(θC; CE: net; peers: net 1)",
                xlabel="epoch",
                ylabel="%",
            )
            warmup = None
            for s in runs.get("stop", {}).values():
                warmup = s.get("warmup_epochs")
            for ax in (top, bottom):
                if warmup:
                    ax.axvline(warmup, color="grey", lw=0.8, ls=":")
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags (defined when it runs, not when it is imported)."""
    flags.DEFINE_string("out", "benchmarks/results/memorisation", "Output directory.")
    flags.DEFINE_string("npz", DEFAULT_NPZ, "Dataset npz (default: Fashion-MNIST).")
    flags.DEFINE_bool("quick", False, "A one-minute smoke version (used by the tests).")
    flags.DEFINE_list("regimes", list(REGIMES), f"Subset of {tuple(REGIMES)}.")
    flags.DEFINE_list("noises", list(NOISES), f"Subset of {tuple(NOISES)}.")
    flags.DEFINE_list("seeds", ["0", "1"], "Seeds (weights, batches and noisy labels).")
    flags.DEFINE_list("methods", [], "Subset of the methods (default: all).")
    flags.DEFINE_enum(
        "sweep_granularity", "channel", GRANULARITIES, "Granularity of the τ sweep."
    )
    flags.DEFINE_integer("jobs", 2, "Trainings run at once, each on one thread.")
    flags.DEFINE_bool("report_only", False, "Only collect finished runs and write.")


def main(argv):
    del argv
    if not os.path.exists(FLAGS.npz):
        sys.exit(f"memorisation: --npz={FLAGS.npz} does not exist.")
    regimes = QUICK_REGIMES if FLAGS.quick else REGIMES
    names = list(QUICK_REGIMES) if FLAGS.quick else FLAGS.regimes
    all_methods = methods_for(FLAGS.sweep_granularity)
    methods = list(QUICK_METHODS) if FLAGS.quick else (FLAGS.methods or all_methods)
    problems = [f"--regimes: unknown {r!r}" for r in names if r not in regimes]
    problems += [f"--noises: unknown {n!r}" for n in FLAGS.noises if n not in NOISES]
    problems += [f"--methods: unknown {m!r}" for m in methods if m not in all_methods]
    if problems:
        sys.exit("memorisation: " + "; ".join(problems))
    noises = ["sym50"] if FLAGS.quick else FLAGS.noises
    seeds = [0] if FLAGS.quick else [int(s) for s in FLAGS.seeds]
    os.makedirs(FLAGS.out, exist_ok=True)
    jobs = [
        Job(r, n, s, m, os.path.join(FLAGS.out, "runs", r, n, f"seed{s}", m))
        for r in names
        for n in noises
        for s in seeds
        for m in methods
    ]
    if not FLAGS.report_only:
        run_jobs(jobs, FLAGS.out, regimes, FLAGS.npz, FLAGS.jobs, print)
    # Everything finished under --out, not only this part's runs.
    every = [
        Job(r, n, s, m, os.path.join(FLAGS.out, "runs", r, n, f"seed{s}", m))
        for r in regimes
        for n in NOISES
        for s in range(10)
        for m in all_methods
    ]
    settings = {name: dataclasses.asdict(regime) for name, regime in regimes.items()}
    results_path = os.path.join(FLAGS.out, "results.json")
    results = merge_committed(collect(every), results_path, settings)
    setting = {name: settings[name] for name in results}
    with open(results_path, "w") as f:
        json.dump({"regimes": setting, "runs": results}, f, separators=(",", ":"))
    rows = verdicts(results)
    text = "\n".join(
        [
            markdown_tables(results, all_methods),
            verdict_table(rows),
            layer_table(results),
        ]
    )
    with open(os.path.join(FLAGS.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    try:
        plot_curves(results, all_methods, os.path.join(FLAGS.out, "curves.png"))
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install .[report])")


if __name__ == "__main__":
    define_flags()
    app.run(main)
