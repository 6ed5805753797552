"""Figures and tables over finished runs: `python -m galkeras.report RUN_DIR...
--out=DIR`.

Reads the run directories that `python -m galkeras.train` writes (`config.json`,
`summary.json` once finished, `history.csv`, `steps.csv`) and reproduces the
paper's outputs from them (Yan et al., Applied Sciences 2023, 13(3), 1823):

- `accuracy_figure`: one run's test accuracy per epoch of θA, θB, joint and θC,
  best and last epoch marked (the numbers behind Table 1's Best / Last);
- `agreement_figure`: the agreement ratio over iterations, one curve per run
  (Figure 1);
- `tau_figure`: the joint prediction's best and last test accuracy against τ, one
  panel per noise setting (Figure 4);
- `table_markdown`: Best / Last / Best − Last / Last10 (and Selected, with a noisy
  held-out split) per method and noise setting (Table 1 layout; its rows also
  cover Table 4's ablations), with the paper's numbers of Tables 1-3
  (`PAPER_RESULTS`) under the rows of the methods they report. Best is
  test-selected and labelled so. Runs that measured their calibration add its
  test ECE and NLL, and the ECE of the served (calibrated) probabilities;
- `reliability_figure`: one run's reliability diagram, each network's and the
  served probabilities' accuracy against confidence on the clean test split.

The functions take arguments; only `main` reads flags. Figures need matplotlib
(`pip install "galkeras[report]"`) and are drawn on the non-interactive Agg
canvas, without pyplot, so a notebook's own backend is left alone.
"""

import csv
import dataclasses
import glob
import json
import math
import os
import statistics
import sys
import types
from typing import NamedTuple

from absl import app, flags

from galkeras import train

CONFIG, SUMMARY, HISTORY, STEPS = (
    "config.json",
    "summary.json",
    "history.csv",
    "steps.csv",
)
# GAL's networks, which every GAL summary holds; a peer's summary holds its own
# (`net` for CE; `net1`, `net2` and `joint` for the two-network peers).
NETWORKS = train.NETWORKS
NETWORK_LABELS = {
    "twin_a": "θA",
    "twin_b": "θB",
    "joint": "joint (θA+θB)",
    "student": "θC",
    "net": "net",
    "net1": "net 1",
    "net2": "net 2",
}
AGREEMENT_COLUMNS = {
    "agreement_ratio": "share of variables",
    "agreement_param_ratio": "share of parameters",
}
FIGURES = ("accuracy", "agreement", "tau", "reliability", "table")

DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "cifar10n": "CIFAR-10N",
    "cifar100n": "CIFAR-100N",
    "animal10n": "Animal-10N",
    "clothing1m": "Clothing1M",
}
# Datasets whose own labels are the noise: a column is named after the dataset.
REAL_NOISE_DATASETS = ("animal10n", "clothing1m")
SYNTHETIC_NOISE_NAMES = {
    "sym": "Sym",
    "asym": "Asym",
    "pairflip": "Pairflip",
    "sym_inclusive": "Sym-inclusive",
}
# Table rows: the paper's order for the methods (Cross Entropy, then the peers,
# keeping the order of Tables 1, 2 and 3 alike; the methods galkeras does not
# implement appear only with the paper's numbers), then Table 4's ablations, GAL
# last.
METHOD_ORDER = (
    "Cross Entropy",
    "MentorNet",
    "Decoupling",
    "Co-teaching",
    "Co-teaching+",
    "JoCoR",
    "Co-learning",
    "TCNet",
    "ELR",
    "FINE",
    "F-div",
    "Label Smooth",
    "Random Updating",
    "θA+θB+CE",
    "θA+θB+Random Updating",
    "θA+θB+GAU",
    "GAL",
)
# `--method` -> row name, for the methods other than GAL.
METHOD_LABELS = {
    "ce": "Cross Entropy",
    "coteaching": "Co-teaching",
    "coteaching_plus": "Co-teaching+",
    "jocor": "JoCoR",
}
_TWIN_METHODS = {
    "all": "θA+θB+CE",
    "random": "θA+θB+Random Updating",
    "agreement": "θA+θB+GAU",
}
_DEFAULT_CONFIG = train.TrainConfig()
MISSING = "–"
# Decimals of the table's calibration columns (accuracies in percent get one).
_DIGITS = {"ece": 3, "nll": 3, "ece_served": 3}


class Setting(NamedTuple):
    """A noise setting: one column group of Table 1, one panel of Figure 4.

    `noise_rate` is None for real noise (a CIFAR-N label set, Animal-10N,
    Clothing1M) and for clean labels, whose configs carry an unused rate.
    """

    dataset: str
    noise_type: str
    noise_rate: float | None


# The paper's Table 1 (Yan et al., "Gradient Agreement Hinders the Memorization
# of Noisy Labels", Applied Sciences 2023, 13(3), 1823): PreAct ResNet-18 on
# CIFAR-10 and CIFAR-100, (best, last, best − last) test accuracy (%) per method
# as printed there, in the order of `PAPER_TABLE1_SETTINGS`; None where the paper
# has no number (MentorNet on asymmetric noise). Its Best−Last is Best − Last
# except for JoCoR at CIFAR-10 Sym 20%, printed 1.1 where 90.2 − 88.9 = 1.3.
PAPER_TABLE1_SETTINGS = (
    Setting("cifar10", "sym", 0.2),
    Setting("cifar10", "sym", 0.5),
    Setting("cifar10", "sym", 0.8),
    Setting("cifar10", "asym", 0.4),
    Setting("cifar100", "sym", 0.2),
    Setting("cifar100", "sym", 0.5),
    Setting("cifar100", "sym", 0.8),
)
_PAPER_TABLE1_ROWS = {
    "Cross Entropy": (
        (86.8, 82.7, 4.1),
        (79.4, 57.9, 21.5),
        (62.9, 26.1, 36.8),
        (85.0, 72.3, 12.7),
        (62.0, 61.8, 0.2),
        (46.7, 37.3, 9.4),
        (19.9, 8.8, 11.1),
    ),
    "MentorNet": (
        (86.6, 85.2, 1.4),
        (82.4, 81.3, 1.1),
        (63.1, 41.9, 21.2),
        None,
        (61.8, 61.1, 0.7),
        (47.3, 38.5, 8.8),
        (22.8, 11.6, 11.2),
    ),
    "Co-teaching": (
        (87.9, 86.5, 1.4),
        (83.5, 81.9, 1.6),
        (64.4, 44.2, 20.2),
        (87.1, 85.2, 1.9),
        (63.4, 62.8, 0.6),
        (50.3, 48.5, 1.8),
        (25.6, 13.2, 12.4),
    ),
    "Co-teaching+": (
        (89.5, 88.2, 1.3),
        (85.7, 84.1, 1.6),
        (67.4, 45.5, 21.9),
        (87.8, 86.4, 1.4),
        (65.6, 64.1, 1.5),
        (51.8, 45.3, 6.5),
        (27.9, 15.5, 12.4),
    ),
    "JoCoR": (
        (90.2, 88.9, 1.1),
        (85.3, 83.8, 1.5),
        (69.2, 45.1, 24.1),
        (88.3, 86.6, 1.7),
        (65.4, 64.3, 1.1),
        (52.5, 50.4, 2.1),
        (27.1, 15.7, 11.4),
    ),
    "Co-learning": (
        (93.1, 92.5, 0.6),
        (88.6, 87.6, 1.0),
        (76.2, 62.4, 13.8),
        (88.0, 86.5, 1.5),
        (69.5, 68.9, 0.6),
        (59.8, 59.1, 0.7),
        (38.6, 35.2, 3.4),
    ),
    "GAL": (
        (93.7, 93.5, 0.2),
        (90.5, 90.1, 0.4),
        (78.9, 78.3, 0.6),
        (91.6, 91.2, 0.4),
        (70.5, 70.1, 0.4),
        (61.3, 60.8, 0.5),
        (40.8, 40.2, 0.6),
    ),
}
# (method row, Setting) -> (best, last, best − last) of the paper's Table 1.
PAPER_TABLE1 = {
    (method, setting): result
    for method, results in _PAPER_TABLE1_ROWS.items()
    for setting, result in zip(PAPER_TABLE1_SETTINGS, results, strict=True)
    if result is not None
}
ANIMAL10N = Setting("animal10n", "none", None)
CLOTHING1M = Setting("clothing1m", "none", None)
# The paper's Table 2 (Animal-10N): (best, last, None) as printed there, under
# our row names (its "CE" is Cross Entropy, "Co-Teaching" Co-teaching, and so
# on); it prints no Best−Last.
PAPER_TABLE2 = {
    (method, ANIMAL10N): (best, last, None)
    for method, (best, last) in {
        "Cross Entropy": (82.68, 81.1),
        "Decoupling": (79.22, 78.24),
        "Co-teaching": (82.43, 81.52),
        "Co-teaching+": (50.66, 48.52),
        "JoCoR": (82.88, 81.06),
        "Co-learning": (82.95, 81.18),
        "GAL": (83.33, 82.91),
    }.items()
}
# The paper's Table 3 (Clothing1M) prints one test accuracy per method and does
# not say at which epoch it was taken: (accuracy, None, None), shown as Best.
PAPER_TABLE3 = {
    (method, CLOTHING1M): (accuracy, None, None)
    for method, accuracy in {
        "JoCoR": 70.30,
        "TCNet": 71.15,
        "ELR": 72.87,
        "FINE": 72.91,
        "F-div": 73.09,
        "Label Smooth": 73.44,
        "GAL": 73.62,
    }.items()
}
# (method row, Setting) -> (best, last, best − last) of the paper's tables, None
# where a table prints no such number; and the table of each setting.
PAPER_RESULTS = {**PAPER_TABLE1, **PAPER_TABLE2, **PAPER_TABLE3}
PAPER_TABLES = {
    **dict.fromkeys(PAPER_TABLE1_SETTINGS, 1),
    ANIMAL10N: 2,
    CLOTHING1M: 3,
}
# The label of the line under a method's row that holds the paper's numbers.
PAPER_LINE = "↳ paper"


@dataclasses.dataclass
class Run:
    """One `galkeras.train` run directory, as `load_run` reads it.

    Attributes:
        path: str, the run directory.
        config: dict, `config.json` (the run's flags).
        summary: dict, `summary.json`; None while the run is unfinished.
        history: dict, `history.csv` column -> list of floats, one per epoch
            (empty before the first epoch ends).
        steps: dict, `steps.csv` column -> list (floats; `phase` is str), one per
            logged step; None when the run has no `steps.csv`.
    """

    path: str
    config: dict
    summary: dict | None
    history: dict
    steps: dict | None

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def dataset(self):
        """The dataset's name (`summary.json`'s, else derived from the flag)."""
        if self.summary and self.summary.get("dataset"):
            return self.summary["dataset"]
        spec = self.config["dataset"]
        if ":" in spec:  # `npz:PATH`, `folder:PATH`: named after the path
            path = os.path.normpath(spec.split(":", 1)[1])
            return os.path.splitext(os.path.basename(path))[0]
        return spec

    @property
    def setting(self):
        noise_type = self.config["noise_type"]
        synthetic = noise_type in SYNTHETIC_NOISE_NAMES
        rate = float(self.config["noise_rate"]) if synthetic else None
        return Setting(self.dataset, noise_type, rate)

    @property
    def label(self):
        """A short name of the run's setting, e.g. "cifar10 sym 50%"."""
        dataset, noise_type, rate = self.setting
        if rate is not None:
            return f"{dataset} {noise_type} {_percent(rate)}%"
        if noise_type == "none":
            return dataset if dataset in REAL_NOISE_DATASETS else f"{dataset} clean"
        return f"{dataset} {noise_type}"

    @property
    def method(self):
        """`--method`; runs made before the flag existed are GAL runs."""
        return self.config.get("method", "gal")

    @property
    def reported_network(self):
        if self.summary and self.summary.get("reported_network"):
            return self.summary["reported_network"]
        # Summaries older than the `reported_network` key: train's own rule.
        config = types.SimpleNamespace(**self.config_with_defaults())
        return train.reported_network(config)

    def config_with_defaults(self):
        """The config, with today's defaults for flags the run predates."""
        return {**dataclasses.asdict(_DEFAULT_CONFIG), **self.config}


def load_run(run_dir):
    """Reads a `galkeras.train` run directory.

    Args:
        run_dir: str, a directory holding at least `config.json`.

    Returns:
        A `Run`.

    Raises:
        ValueError: naming the path and what is missing or malformed: no such
            directory, no `config.json`, a file that does not parse, a finished
            run (with `summary.json`) without its `history.csv`, or a summary
            without the accuracies of GAL's four networks (GAL) or of the
            reported network (any other method).
    """
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir}: no such run directory.")
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{run_dir} is not a galkeras.train run directory: it has no {CONFIG}."
        )
    config = _read_json(config_path)
    missing = [k for k in ("dataset", "noise_type", "noise_rate") if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}.")
    summary_path = os.path.join(run_dir, SUMMARY)
    summary = _read_json(summary_path) if os.path.exists(summary_path) else None
    history_path = os.path.join(run_dir, HISTORY)
    history = _read_csv(history_path) if os.path.exists(history_path) else {}
    steps_path = os.path.join(run_dir, STEPS)
    steps = (
        _read_csv(steps_path, text_columns=("phase",))
        if os.path.exists(steps_path)
        else None
    )
    run = Run(run_dir, config, summary, history, steps)
    if summary is not None:
        if not any(history.values()):
            raise ValueError(
                f"{run_dir} has a {SUMMARY} but no epochs in {HISTORY}: the run "
                "directory is incomplete."
            )
        required = NETWORKS if run.method == "gal" else (run.reported_network,)
        for net in required:
            if not isinstance(summary.get(net), dict) or "best" not in summary[net]:
                raise ValueError(f"{summary_path} lacks the {net} accuracies.")
    return run


def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not an object.")
    return value


def _read_csv(path, text_columns=()):
    """A CSV with a header as column -> list; empty when the file is (still)
    empty. Cells are floats except in `text_columns`."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], [r for r in rows[1:] if r]
    columns = {name: [] for name in header}
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {line}: {len(row)} cells under {len(header)} columns."
            )
        for name, cell in zip(header, row):
            if name in text_columns:
                columns[name].append(cell)
                continue
            try:
                columns[name].append(float(cell) if cell else math.nan)
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: column {name} holds {cell!r}, not a number."
                ) from None
    return columns


# ----------------------------------------------------------------- labels
def method_label(run):
    """The run's row name in Table 1 / Table 4.

    "Cross Entropy" for `--method=ce` and for a GAL run that is cross entropy (θA
    reported: warm-up for every epoch, no θC; runs made before `--method`);
    "Co-teaching", "Co-teaching+" and "JoCoR" for the peers. For GAL: "GAL" for
    agreement updating reported by θC, "θA+θB+CE" / "θA+θB+Random Updating" /
    "θA+θB+GAU" for twin ablations reported by their joint prediction (update rule
    all / random / agreement). A non-default `sampling`, and for agreement
    updating a non-default `tau`, are appended, e.g. "GAL (τ=0.6)"; so are a
    peer's non-default `num_gradual`, `forget_exponent`, `divide_twice`,
    `softmax_twice`, and a `forget_rate` other than the noise rate (r/2 for
    asym). Flags that cannot change the method's result (τ without agreement,
    anything for Cross Entropy) are not, so they do not split a row; neither are
    `co_lambda` and `init_epoch`, which Table 1 sets per dataset and noise (as
    the official code of JoCoR and Co-teaching+ does).
    """
    config = run.config_with_defaults()
    method = config["method"]
    if method != "gal":
        base = METHOD_LABELS.get(method, method)
        variants = _peer_variants(config)
        return f"{base} ({', '.join(variants)})" if variants else base
    network, rule = run.reported_network, config["update_rule"]
    if network == "twin_a":
        return "Cross Entropy"
    if network == "student" and rule == "agreement":
        base = "GAL"
    else:
        base = _TWIN_METHODS.get(rule, f"θA+θB+{rule}")
        if network == "student":
            base += "+θC"
    variants = []
    if config["sampling"] != _DEFAULT_CONFIG.sampling:
        variants.append(f"sampling={config['sampling']}")
    if rule == "agreement" and float(config["tau"]) != _DEFAULT_CONFIG.tau:
        variants.append(f"τ={float(config['tau']):g}")
    return f"{base} ({', '.join(variants)})" if variants else base


def _peer_variants(config):
    """A peer's flags that split its row (see `method_label`), as "flag=value"."""
    used = train.METHOD_FLAGS.get(config["method"], ())
    variants = []
    rate = config["forget_rate"]
    if "forget_rate" in used and rate is not None:
        noise = types.SimpleNamespace(**{**config, "forget_rate": None})
        # Real noise has no default rate: every such run states its own.
        synthetic = config["noise_type"] in SYNTHETIC_NOISE_NAMES
        if synthetic and float(rate) != train.method_forget_rate(noise):
            variants.append(f"forget_rate={float(rate):g}")
    for flag in ("num_gradual", "forget_exponent", "divide_twice", "softmax_twice"):
        value = config[flag]
        if flag not in used or value == getattr(_DEFAULT_CONFIG, flag):
            continue
        variants.append(flag if isinstance(value, bool) else f"{flag}={value:g}")
    return variants


def setting_label(setting):
    """A noise setting as the paper names it, e.g. "CIFAR-10 Sym 20%",
    "Animal-10N", "CIFAR-10N Aggre"."""
    dataset, noise_type, rate = setting
    name = DATASET_NAMES.get(dataset, dataset)
    if rate is not None:
        return f"{name} {SYNTHETIC_NOISE_NAMES[noise_type]} {_percent(rate)}%"
    if noise_type == "none":
        return name if dataset in REAL_NOISE_DATASETS else f"{name} Clean"
    return f"{name} {noise_type.capitalize()}"


def _setting_order(setting):
    dataset, noise_type, rate = setting
    datasets, kinds = list(DATASET_NAMES), [*SYNTHETIC_NOISE_NAMES, "none"]
    return (
        datasets.index(dataset) if dataset in datasets else len(datasets),
        dataset,
        kinds.index(noise_type) if noise_type in kinds else len(kinds),
        noise_type,
        -1.0 if rate is None else rate,
    )


def _method_order(label):
    base = label.split(" (")[0]
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, label)


def _percent(rate):
    return f"{100 * rate:g}"


def _number(x, digits=1):
    text = f"{x:.{digits}f}"
    return text[1:] if float(text) == 0 and text.startswith("-") else text


def _mean_std(values, digits=1):
    """`digits` decimals; "mean ± std" (std over runs, ddof=0) for two or more."""
    if len(values) == 1:
        return _number(values[0], digits)
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    return f"{_number(mean, digits)} ± {_number(std, digits)}"


# ------------------------------------------------------------------ table
def table_markdown(runs, ablation_rows=False, paper=True, paper_methods=False):
    """Best / Last / Best − Last / Last10 (/ Selected) test accuracy (%) in the
    layout of the paper's Table 1 (whose rows also take Table 4's ablations),
    with the paper's own numbers beside ours.

    One column group per noise setting (e.g. "CIFAR-10 Sym 20%", "Animal-10N"),
    each with Best† (test-selected, so marked, with the mark explained under the
    table), Last, B−L and Last10 columns, and Selected (the test accuracy at the
    epoch of best noisy held-out accuracy) when any run of the table has it; a
    run without it gets "–" there. A summary older than `last10` gets it from
    the run's history. One row per method (`method_label`), on
    the network that method reports (θC for GAL; Cross Entropy's one network,
    or θA of a GAL run that is cross entropy; net 1 for Co-teaching,
    Co-teaching+ and JoCoR; the joint prediction for twin ablations). Runs
    sharing a cell (e.g. seeds) are averaged and shown as mean ± std over the
    runs (ddof=0). A method without a run in a setting gets "–". Markdown has
    one header row, so the group names form the header and the column names the
    first row.

    Under the row of each method that the paper reports in a setting of the
    table (its label exactly, so "GAL (τ=0.6)" gets none), a "↳ paper" line
    holds the paper's Best, Last and Best−Last (`PAPER_RESULTS`: Table 1 for
    CIFAR, Table 2 for Animal-10N, Table 3 for Clothing1M), and "–" where the
    paper prints none: Table 2 prints no Best−Last, and Table 3's one accuracy
    per method stands under Best.

    Below the table: a line per run with model selection (Clothing1M's test
    accuracy at the best validation epoch, Table 3), and a line per run left out
    because it is unfinished (no `summary.json`) or a dry run.

    Args:
        runs: iterable of `Run`.
        ablation_rows: Table 4's rows that come from another network of a run:
            a GAL run's joint prediction is "θA+θB+GAU" (θC does not influence
            the twins), and a random-updating run's θA alone is "Random
            Updating" (its updates do not depend on θB).
        paper: the "↳ paper" lines.
        paper_methods: also a row for each method that the paper reports in a
            setting of the table but that has no run here ("–" in our cells,
            the paper's numbers under it), such as MentorNet and Co-learning,
            which galkeras does not implement: the whole of the paper's table
            beside ours.

    Returns:
        The Markdown text, ending in a newline.
    """
    cells, notes, skipped = {}, [], []
    for run in runs:
        if run.summary is None:
            skipped.append(f"Skipped {run.path}: unfinished (no {SUMMARY}).")
            continue
        if run.summary.get("dry_run"):
            skipped.append(f"Skipped {run.path}: a dry run (stand-in data).")
            continue
        method, setting = method_label(run), run.setting
        entries = [(method, run.reported_network)]
        if ablation_rows:
            base, _, variant = method.partition(" (")
            variant = f" ({variant}" if variant else ""
            if base == "GAL":
                entries.append((f"θA+θB+GAU{variant}", "joint"))
            elif base == "θA+θB+Random Updating":
                entries.append((f"Random Updating{variant}", "twin_a"))
        for label, network in entries:
            cells.setdefault((label, setting), []).append(_results(run, network))
        selection = run.summary.get("model_selection")
        if selection:
            notes.append(
                f"{run.name} ({method}, {setting_label(setting)}): test at best "
                f"validation epoch {selection['epoch']}: "
                f"{_number(selection['test_accuracy'])} "
                f"(validation {_number(selection['validation_accuracy'])})."
            )
    settings = sorted({s for _, s in cells}, key=_setting_order)
    paper_rows = {m for m, s in PAPER_RESULTS if s in settings}
    paper = paper and bool(paper_rows)
    methods = {m for m, _ in cells}
    if paper and paper_methods:
        methods.update(paper_rows)
    methods = sorted(methods, key=_method_order)
    keys = ["best", "last", "best_minus_last", "last10"]
    headers = ["Best†", "Last", "B−L", "Last10"]
    if any(r["selected"] is not None for rs in cells.values() for r in rs):
        keys.append("selected")
        headers.append("Selected")
    if any(r["ece"] is not None for rs in cells.values() for r in rs):
        keys += ["ece", "nll", "ece_served"]
        headers += ["ECE", "NLL", "ECE served"]
    lines = []
    if cells:
        groups = "".join(
            f" {setting_label(s)} |" + " |" * (len(keys) - 1) for s in settings
        )
        lines += [
            f"| Method |{groups}",
            "|---" * (1 + len(keys) * len(settings)) + "|",
            "| |" + "".join(f" {h} |" for h in headers) * len(settings),
        ]
        for method in methods:
            row = [method]
            for setting in settings:
                results = cells.get((method, setting))
                if results is None:
                    row += [MISSING] * len(keys)
                    continue
                for key in keys:
                    values = [r[key] for r in results]
                    # A cell is a mean over all its runs, or nothing.
                    digits = _DIGITS.get(key, 1)
                    row.append(MISSING if None in values else _mean_std(values, digits))
            lines.append("| " + " | ".join(row) + " |")
            if paper and method in paper_rows:
                lines.append(_paper_line(method, settings, len(keys)))
        lines += [
            "",
            "† Best is test-selected: the test accuracy at the epoch of best test "
            "accuracy, which no practitioner can choose.",
        ]
        if paper:
            tables = sorted({PAPER_TABLES[s] for s in settings if s in PAPER_TABLES})
            note = (
                f"{PAPER_LINE}: the paper's Table{'s' * (len(tables) > 1)} "
                f"{_and(map(str, tables))} (Yan et al., Applied Sciences 2023) for "
                "the method above: Best, Last and Best−Last as printed there (its "
                "Best is test-selected too; it reports no Last10 or Selected)."
            )
            if 2 in tables:
                note += " Table 2 (Animal-10N) prints no Best−Last."
            if 3 in tables:
                note += (
                    " Table 3 (Clothing1M) prints one test accuracy per method and "
                    "does not say at which epoch: it stands under Best†."
                )
            note += (
                " The paper names its peers' backbone only in Table 1 (PreAct "
                "ResNet-18) and their training recipe nowhere; galkeras trains "
                "every method under GAL's protocol (§4.1.2)."
            )
            unrun = [m for m in methods if not any((m, s) in cells for s in settings)]
            if unrun:
                note += (
                    f" Rows of – are methods without a run here ({', '.join(unrun)})."
                )
            implemented = {*METHOD_LABELS.values(), "GAL"}
            foreign = [m for m in unrun if m not in implemented]
            if foreign:
                note += f" galkeras does not implement {_and(foreign)}."
            lines += ["", note]
        lines += [
            "",
            "Test accuracy (%) of the network each method reports (GAL: θC; Cross "
            "Entropy: its one network, or θA of a GAL run that is cross entropy; "
            "Co-teaching, Co-teaching+, JoCoR: net 1; θA+θB: their joint "
            "prediction), at its best epoch (Best) "
            f"and last epoch (Last), and the mean over its last {train.LAST_EPOCHS} "
            "epochs (Last10)"
            + (
                "; Selected: at the epoch of its best accuracy on the noisy "
                "held-out split (no clean data needed)"
                if "selected" in keys
                else ""
            )
            + ". a ± b: mean ± std over the runs of a cell.",
        ]
        if "ece" in keys:
            lines += [
                "",
                "ECE (10 equal-width confidence bins) and NLL (nats): the last "
                "epoch's probabilities against the clean test labels, "
                "uncalibrated; ECE served: of the exported probabilities "
                "(`--calibrate`, noise-corrected temperature by default), – where "
                "the row's network is not the one exported.",
            ]
    else:
        lines.append("No finished runs.")
    if notes:
        lines += ["", "Model selection:", *(f"- {n}" for n in notes)]
    if skipped:
        lines += ["", *skipped]
    return "\n".join(lines) + "\n"


def _paper_line(method, settings, width):
    """The "↳ paper" row of `method`: the paper's Best, Last and Best−Last in
    each setting where it prints them, "–" in every other cell."""
    row = [PAPER_LINE]
    for setting in settings:
        result = PAPER_RESULTS.get((method, setting))
        cells = [_paper_number(x) for x in result] if result else [MISSING] * 3
        row += (cells + [MISSING] * width)[:width]
    return "| " + " | ".join(row) + " |"


def _paper_number(x):
    """A number of the paper's at the precision it prints (one decimal in Table
    1, up to two in Tables 2 and 3); "–" for None."""
    if x is None:
        return MISSING
    text = f"{x:.1f}"
    return text if float(text) == x else f"{x:.2f}"


def _and(names):
    """Names joined as prose: "a", "a and b", "a, b and c"."""
    names = list(names)
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def _results(run, network):
    """`network`'s table entries of a finished run: best, last, best_minus_last,
    last10 and selected (None when the run has none). A summary older than
    `last10` gets it from the run's history, as `train.summarise` computes it."""
    results = run.summary[network]
    last10 = results.get("last10")
    column = accuracy_columns(run.history).get(network)
    if last10 is None and column and run.history[column]:
        recent = run.history[column][-train.LAST_EPOCHS :]
        last10 = 100.0 * sum(recent) / len(recent)
    calibration = run.summary.get("calibration") or {}
    measured = calibration.get("networks", {}).get(network) or {}
    served = calibration.get("served") or {}
    return {
        "best": results["best"],
        "last": results["last"],
        "best_minus_last": results["best_minus_last"],
        "last10": last10,
        "selected": results.get("selected"),
        "ece": measured.get("ece"),
        "nll": measured.get("nll"),
        "ece_served": served.get("ece") if served.get("network") == network else None,
    }


# ---------------------------------------------------------------- figures
def require_matplotlib():
    """Raises ImportError, saying how to install it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'galkeras.report\'s figures need matplotlib: pip install "galkeras[report]"'
        ) from error


def _figure(nrows=1, ncols=1, figsize=(7, 4.5)):
    """A Figure on the Agg canvas and its axes, without touching pyplot."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def accuracy_columns(history):
    """network -> the history column of its test accuracy: `test_*` when the run
    had a validation split (then `val_*` is validation), else `val_*` (which is
    then the test set). Networks without a column are left out: a GAL run has
    θA, θB, joint and θC, a peer's its own (`net`; `net1`, `net2`, `joint`)."""
    test = any(f"test_{net}_accuracy" in history for net in train.ALL_NETWORKS)
    prefix = "test_" if test else "val_"
    return {
        net: f"{prefix}{net}_accuracy"
        for net in train.ALL_NETWORKS
        if f"{prefix}{net}_accuracy" in history
    }


def accuracy_figure(run):
    """Test accuracy (%) per epoch of θA, θB, their joint prediction and θC (a
    peer's: its networks and their joint prediction), each curve with its best
    epoch (marker and value) and last epoch (square) marked: the curves behind
    Table 1's Best and Last. A dotted line ends GAL's warm-up.

    Lines carry a `gid` for inspection: the network ("twin_a", ...), the network
    + "/best" or "/last" for the markers, and "warmup".

    Args:
        run: a `Run` with at least one epoch in its history.

    Returns:
        A matplotlib Figure.
    """
    columns = accuracy_columns(run.history)
    if not columns or not run.history[next(iter(columns.values()))]:
        raise ValueError(f"{run.path} has no test accuracies in {HISTORY} yet.")
    fig, axes = _figure()
    from matplotlib.ticker import MaxNLocator

    ax = axes[0, 0]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for net, column in columns.items():
        accuracy = [100.0 * a for a in run.history[column]]
        # Epochs are 1-based on the axis, like summary.json's `model_selection`.
        epochs = [e + 1 for e in run.history.get("epoch", range(len(accuracy)))]
        finite = [i for i, a in enumerate(accuracy) if not math.isnan(a)]
        best = max(finite, key=accuracy.__getitem__)
        last = len(accuracy) - 1
        label = (
            f"{_network_label(run, net)} (test-selected best {accuracy[best]:.1f}, "
            f"last {accuracy[last]:.1f})"
        )
        (line,) = ax.plot(epochs, accuracy, label=label, gid=net, lw=1.2)
        color = line.get_color()
        ax.plot(epochs[best], accuracy[best], "o", color=color, gid=f"{net}/best")
        ax.annotate(
            f"{accuracy[best]:.1f}",
            (epochs[best], accuracy[best]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
            color=color,
        )
        ax.plot(
            epochs[last],
            accuracy[last],
            "s",
            color=color,
            markerfacecolor="none",
            gid=f"{net}/last",
        )
    # Only GAL has a warm-up; a peer's config carries the unused default.
    warmup = int(run.config.get("warmup_epochs", 0)) if run.method == "gal" else 0
    if 0 < warmup < int(run.config.get("epochs", warmup + 1)):
        ax.axvline(warmup, color="grey", lw=0.8, ls=":", gid="warmup")
    ax.set(
        title=f"{run.label}, {method_label(run)} ({run.name})",
        xlabel="epoch",
        ylabel="test accuracy (%)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reliability_figure(run):
    """The run's reliability diagram on the clean test split: per network, the
    accuracy of each confidence bin (10 equal-width bins of the top-class
    probability) against the bin's mean confidence, at the last epoch and
    uncalibrated, and the served probabilities after `--calibrate` (thick);
    the diagonal is perfect calibration. Each label gives the ECE.

    Lines carry a `gid`: the network's name, "served" and "diagonal".

    Args:
        run: a finished `Run` whose `summary.json` has `calibration`.

    Returns:
        A matplotlib Figure.
    """
    calibration = (run.summary or {}).get("calibration")
    if not calibration:
        raise ValueError(
            f"{run.path} has no calibration in its {SUMMARY} (unfinished, or "
            "made before calibration was measured)."
        )
    fig, axes = _figure(figsize=(5.5, 5.5))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", gid="diagonal")

    def curve(measured, label, gid, **style):
        bins = measured["reliability"]
        points = [
            (c, a)
            for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"])
            if n
        ]
        if not points:
            return
        confidence, accuracy = zip(*points)
        ax.plot(
            confidence,
            accuracy,
            "o-",
            label=f"{label} (ECE {measured['ece']:.3f})",
            gid=gid,
            **style,
        )

    networks = calibration["networks"]
    for net in sorted(networks, key=_network_order):
        curve(networks[net], _network_label(run, net), net, lw=1, ms=3)
    served = calibration.get("served")
    if served and served["method"] != "none":
        label = (
            f"served {_network_label(run, served['network'])}, "
            f"t = {served['temperature']:.3g}"
        )
        curve(served, label, "served", lw=2.5, ms=5, color="black")
    ax.set(
        title=f"{run.label}, {method_label(run)} ({run.name})",
        xlabel="confidence (top-class probability)",
        ylabel="accuracy on the clean test labels",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _network_order(net):
    order = train.ALL_NETWORKS
    return order.index(net) if net in order else len(order)


def _network_label(run, net):
    """A network's name in a figure; a peer's joint prediction is of its nets."""
    if net == "joint" and run.method != "gal":
        return "joint (net 1+net 2)"
    return NETWORK_LABELS.get(net, net)


def agreement_figure(runs, column="agreement_ratio"):
    """The agreement ratio over iterations, one curve per run, as in the paper's
    Figure 1 (twins with `update_rule=all` under 0/20/50/80% noise on CIFAR-10):
    1 during warm-up, where the twins see identical batches, then falling, the
    lower the noisier the labels.

    Args:
        runs: iterable of `Run`; those without `steps.csv` are skipped.
        column: "agreement_ratio" (the share of variables whose gate is open) or
            "agreement_param_ratio" (the share of scalar parameters in them). Runs
            with `agreement_granularity` channel or element always show the share
            of parameters, and say their granularity in their label.

    Returns:
        A matplotlib Figure; each curve's label is the run's label (its run name
        is added where two runs share a label) and its `gid` the run's path.
    """
    if column not in AGREEMENT_COLUMNS:
        raise ValueError(
            f"column={column!r}; choose one of {tuple(AGREEMENT_COLUMNS)}."
        )
    columns = {r.path: _agreement_column(r, column) for r in runs}
    runs = [r for r in runs if r.steps and r.steps.get(columns[r.path])]
    if not runs:
        raise ValueError(f"No run has {column} in a {STEPS}.")
    labels = [r.label for r in runs]
    fig, axes = _figure()
    ax = axes[0, 0]
    for run, label in zip(runs, labels):
        if labels.count(label) > 1:
            label = f"{label} ({run.name})"
        granularity = _granularity(run)
        if granularity != "variable":
            label = f"{label}, {granularity} gates"
        values = run.steps[columns[run.path]]
        ax.plot(run.steps["step"], values, label=label, gid=run.path)
    shown = sorted({columns[r.path] for r in runs}, key=list(AGREEMENT_COLUMNS).index)
    ax.set(
        title="Agreement ratio ("
        + "; ".join(AGREEMENT_COLUMNS[c] for c in shown)
        + ")",
        xlabel="iteration",
        ylabel="agreement ratio",
        ylim=(0, 1.05),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _granularity(run):
    return run.config_with_defaults().get("agreement_granularity", "variable")


def _agreement_column(run, column):
    """The column plotted for `run`: with channel or element gates no variable
    opens as a whole, so such a run's curve is its share of parameters."""
    return "agreement_param_ratio" if _granularity(run) != "variable" else column


def tau_points(runs):
    """Setting -> [(τ, mean best, mean last)] of the joint prediction, sorted by τ,
    over the finished GAL runs with agreement updating (the runs τ acts on); runs
    sharing a τ (e.g. seeds) are averaged."""
    grouped = {}
    for run in runs:
        if run.summary is None or run.summary.get("dry_run"):
            continue
        config = run.config_with_defaults()
        if (
            run.method != "gal"
            or config["update_rule"] != "agreement"
            or run.reported_network == "twin_a"
        ):
            continue
        by_tau = grouped.setdefault(run.setting, {})
        by_tau.setdefault(float(config["tau"]), []).append(run.summary["joint"])
    points = {}
    for setting in sorted(grouped, key=_setting_order):
        points[setting] = [
            (
                tau,
                statistics.fmean(r["best"] for r in results),
                statistics.fmean(r["last"] for r in results),
            )
            for tau, results in sorted(grouped[setting].items())
        ]
    return points


def tau_figure(runs):
    """Best and last test accuracy (%) of the twins' joint prediction against the
    agreement threshold τ, one panel per noise setting, as in the paper's Figure 4
    (CIFAR-10, sym 20/50/80% and asym 40%). Uses the finished runs with agreement
    updating; runs sharing a setting and τ are averaged (`tau_points`).

    Returns:
        A matplotlib Figure; per panel, the lines' `gid`s are "best" and "last".
    """
    points = tau_points(runs)
    if not points:
        raise ValueError("No finished run with update_rule=agreement to plot τ for.")
    fig, axes = _figure(1, len(points), figsize=(4.5 * len(points), 4))
    for ax, (setting, rows) in zip(axes[0], points.items()):
        taus, best, last = zip(*rows)
        ax.plot(taus, best, "o-", label="best (test-selected)", gid="best")
        ax.plot(taus, last, "s--", label="last", gid="last")
        ax.set_xticks(taus)
        ax.set(
            title=setting_label(setting),
            xlabel="τ",
            ylabel="joint test accuracy (%)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- main
def find_run_dirs(patterns):
    """The run directories named by `patterns`, in order and without repeats.

    Each pattern is a run directory (one holding `config.json`), a directory
    whose subdirectories are run directories (one level down), or a glob pattern
    of either.

    Raises:
        ValueError: naming a pattern that matches nothing, a path that does not
            exist, or a directory with no run directory in or under it.
    """
    found = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            paths = sorted(glob.glob(pattern))
            if not paths:
                raise ValueError(f"{pattern} matches nothing.")
        else:
            paths = [pattern]
        for path in paths:
            if not os.path.isdir(path):
                if os.path.exists(path):
                    raise ValueError(f"{path} is not a directory.")
                raise ValueError(f"{path}: no such run directory.")
            if os.path.isfile(os.path.join(path, CONFIG)):
                found.append(path)
                continue
            children = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if os.path.isfile(os.path.join(path, name, CONFIG))
            )
            if not children:
                raise ValueError(
                    f"{path} is not a run directory (no {CONFIG}) and holds none "
                    "one level down."
                )
            found += children
    unique = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def output_names(runs):
    """A file-name stem per run: its directory's name, with parent directories
    prepended ("_"-joined) where names would collide."""
    parts = [os.path.realpath(r.path).strip(os.sep).split(os.sep) for r in runs]
    depth = 1
    while True:
        names = ["_".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(map(len, parts)):
            return names
        depth += 1


def write_report(runs, out_dir, figures=FIGURES, agreement_column="agreement_ratio"):
    """Writes the chosen outputs of `runs` into `out_dir`; returns the table's
    Markdown (None without "table") and a list of warnings.

    Outputs: `accuracy_<run>.png` per run with a history, `reliability_<run>.png`
    per finished run that measured its calibration, `agreement.png`, `tau.png`
    and `table.md`. Existing files of the same names are replaced.
    """
    os.makedirs(out_dir, exist_ok=True)
    warnings = []

    def save(fig, name):
        fig.savefig(os.path.join(out_dir, name), dpi=100)

    if "accuracy" in figures:
        for run, name in zip(runs, output_names(runs)):
            try:
                save(accuracy_figure(run), f"accuracy_{name}.png")
            except ValueError as error:
                warnings.append(f"no accuracy figure: {error}")
    if "reliability" in figures:
        for run, name in zip(runs, output_names(runs)):
            try:
                save(reliability_figure(run), f"reliability_{name}.png")
            except ValueError as error:
                warnings.append(f"no reliability figure: {error}")
    if "agreement" in figures:
        try:
            save(agreement_figure(runs, agreement_column), "agreement.png")
        except ValueError as error:
            warnings.append(f"no agreement figure: {error}")
    if "tau" in figures:
        try:
            save(tau_figure(runs), "tau.png")
        except ValueError as error:
            warnings.append(f"no τ figure: {error}")
    table = None
    if "table" in figures:
        table = table_markdown(runs)
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(table)
    return table, warnings


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("out", None, "Directory for the figures and table.md.")
    flags.DEFINE_list("figures", list(FIGURES), f"Outputs to write, from {FIGURES}.")
    flags.DEFINE_enum(
        "agreement_share",
        "variables",
        ["variables", "parameters"],
        "Figure 1's agreement ratio as a share of variables or of parameters.",
    )
    flags.mark_flag_as_required("out")
    flags.register_validator(
        "figures",
        lambda values: bool(values) and set(values) <= set(FIGURES),
        message=f"--figures must be a non-empty subset of {FIGURES}.",
    )


def main(argv):
    patterns = argv[1:]
    if not patterns:
        _fail("give at least one run directory (or a directory or glob of them).")
    try:
        runs = [load_run(path) for path in find_run_dirs(patterns)]
    except ValueError as error:
        _fail(str(error))
    out = os.path.realpath(FLAGS.out)
    for run in runs:
        inside = os.path.realpath(run.path)
        if out == inside or out.startswith(inside + os.sep):
            _fail(
                f"--out={FLAGS.out} lies inside the run directory {run.path}; "
                "reports never write into a run."
            )
    if set(FLAGS.figures) - {"table"}:
        try:
            require_matplotlib()
        except ImportError as error:
            _fail(f"{error} (or pass --figures=table).")
    column = {"variables": "agreement_ratio", "parameters": "agreement_param_ratio"}
    table, warnings = write_report(
        runs, FLAGS.out, FLAGS.figures, column[FLAGS.agreement_share]
    )
    for warning in warnings:
        print(f"galkeras.report: warning: {warning}", file=sys.stderr)
    if table is not None:
        print(table, end="")
    print(f"galkeras.report: wrote {FLAGS.out}", file=sys.stderr)


def _fail(message):
    print(f"galkeras.report: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_main():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()


# Outputs of each `galkeras.reproduce` experiment.
EXPERIMENT_OUTPUTS = {
    "table1": ("table",),
    "table2": ("table", "accuracy"),
    "table3": ("table", "accuracy"),
    "table4": ("table",),
    "table5": ("table",),
    "tablen": ("table",),
    "figure1": ("agreement",),
    "figure4": ("tau",),
}


def write_experiment(experiment, run_dirs, out_dir):
    """Writes a `galkeras.reproduce` experiment's outputs into
    `<out_dir>/<experiment>/` and returns their paths: `table.md` (Tables 1–5;
    Tables 1–3 with every row of the paper's, Table 4 with its ablation rows),
    `agreement.png` (Figure 1), `tau.png` (Figure 4), and the accuracy curves of
    the single-dataset tables 2 and 3."""
    runs = [load_run(d) for d in run_dirs]
    target = os.path.join(out_dir, experiment)
    outputs = EXPERIMENT_OUTPUTS[experiment]
    figures = tuple(o for o in outputs if o != "table")
    _, warnings = write_report(runs, target, figures=figures)
    for warning in warnings:
        print(f"galkeras.reproduce: warning: {warning}", file=sys.stderr)
    if "table" in outputs:
        table = table_markdown(
            runs,
            ablation_rows=experiment == "table4",
            paper_methods=experiment in ("table1", "table2", "table3"),
        )
        with open(os.path.join(target, "table.md"), "w") as f:
            f.write(table)
    return sorted(
        os.path.join(target, name)
        for name in os.listdir(target)
        if name.endswith((".md", ".png"))
    )
