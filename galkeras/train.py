"""Command-line training: `python -m galkeras.train --flagfile=flags/quickstart.flags`.

This is the only module that reads absl `FLAGS`. `main` turns them into a
`TrainConfig` and calls `run(config)`, which notebooks and tests call directly.
"""

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

from absl import app, flags, logging

from galkeras import noise, run_directory
from galkeras.datasets import DatasetError, check_dataset_spec
from galkeras.datasets.cifar import REAL_NOISE_TYPES
from galkeras.run_directory import (  # noqa: F401  (re-exported)
    LOCK_FILE,
    RunFinished,
    foreign_directory_problems,
    resume_command,
    unused_directory,
    write_run_record,
)
from galkeras.strategy import (  # noqa: F401  (re-exported)
    is_chief,
    make_strategy,
    steps_of_all_workers,
    tf_config_is_chief,
    tf_config_problem,
)
from galkeras.summary import (  # noqa: F401  (re-exported)
    ALL_NETWORKS,
    EXPORTED_NAMES,
    HELDOUT_PREFIX,
    LAST_EPOCHS,
    NETWORKS,
    format_summary,
    summarise,
)

_DEFAULTS = dict(
    method="gal",
    dataset="digits",
    data_dir=None,
    noise_type="sym",
    noise_rate=0.5,
    noise_seed=0,
    seed=0,
    backbone="small_cnn",
    student_backbone="",
    backbone_width=0,
    hidden_units=0,
    pretrained_weights="",
    image_size=(),
    validation_split=0.2,
    noisy_validation_split=0.0,
    labels_csv="",
    skip_corrupt_images=False,
    epochs=30,
    warmup_epochs=12,
    batch_size=64,
    lr=0.06,
    lr_decay_epochs=(12, 24),
    lr_decay_factor=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    weight_decay_mode="coupled",
    tau=0.4,
    epsilon=0.8,
    update_rule="agreement",
    random_update_prob=0.8,
    sampling="cdas",
    masked_update="skip",
    agreement_granularity="variable",
    augment="auto",
    train_student=True,
    student_start="first_epoch",
    model_dir="",
    export_dir="",
    verbose=2,
    log_every_steps=50,
    steps_per_execution=1,
    train_fit=False,
    dry_run=False,
    strategy="auto",
    sync_batchnorm=False,
    mixed_precision="none",
    jit_compile="auto",
    deterministic=False,
    checkpoint_every_steps=0,
    on_nonfinite="stop",
    new_run=False,
    forget_rate=None,
    num_gradual=10,
    forget_exponent=1.0,
    co_lambda=0.9,
    init_epoch=20,
    divide_twice=False,
    softmax_twice=False,
    label_issue_probabilities="auto",
    label_quality_score="self_confidence",
    label_issue_filter="prune_by_noise_rate",
    write_clean_labels="",
    calibrate="noise_corrected",
)

NOISE_TYPES = (*noise.NOISE_TYPES, *REAL_NOISE_TYPES)
DRY_RUN_BATCH = 8
# The names below mirror modules that import TensorFlow; the CLI keeps plain copies
# so it can reject bad flags before TensorFlow loads, and a test checks they agree.
BACKBONES = ("small_cnn", "preact_resnet18", "resnet34", "resnet50")
UPDATE_RULES = ("agreement", "random", "all")
SAMPLING_MODES = ("cdas", "cdas_no_reverse", "random", "identical")
MASKED_UPDATES = ("skip", "zero_grad")
STUDENT_STARTS = ("first_epoch", "split")  # galkeras.model's
# Plain copies of `galkeras.label_issues`' choices (a test checks they agree).
LABEL_QUALITY_SCORES = ("self_confidence", "normalized_margin")
LABEL_ISSUE_FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
CLEAN_LABEL_MODES = ("drop", "relabel")
# A plain copy of `galkeras.calibration.METHODS` (a test checks they agree).
CALIBRATIONS = ("none", "noise_corrected")
# The networks each method can score label issues with.
LABEL_ISSUE_NETWORKS = {
    "gal": ("joint", "student", "twin_a", "twin_b"),
    "ce": ("net",),
    "coteaching": ("joint", "net1", "net2"),
    "coteaching_plus": ("joint", "net1", "net2"),
    "jocor": ("joint", "net1", "net2"),
}
GRANULARITIES = ("variable", "channel", "element")
AUGMENTATIONS = ("auto", "none", "crop", "crop_flip", "resized_crop_flip")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
MIXED_PRECISION = ("none", "bfloat16", "float16")
JIT_COMPILE_VALUES = {"auto": "auto", "true": True, "false": False}
JIT_COMPILE = tuple(JIT_COMPILE_VALUES)
ON_NONFINITE = ("stop", "skip_step")
# The methods (GAL and `galkeras.methods.BY_NAME`, named here so that bad flags
# are refused before TensorFlow loads), and the flags only some of them read; any
# other method refuses them (a silently ignored flag is a wrong experiment). A
# peer's flags are its constructor's arguments of the same name, but for the
# forget-rate flags, which `SmallLossMethod` takes.
METHODS = ("gal", "ce", "coteaching", "coteaching_plus", "jocor")
_SMALL_LOSS = ("forget_rate", "num_gradual", "forget_exponent")
METHOD_FLAGS = {
    "gal": (
        "warmup_epochs",
        "tau",
        "epsilon",
        "update_rule",
        "random_update_prob",
        "sampling",
        "masked_update",
        "agreement_granularity",
        "train_student",
        "student_start",
        "student_backbone",
    ),
    "ce": (),
    "coteaching": (*_SMALL_LOSS, "divide_twice"),
    "coteaching_plus": (*_SMALL_LOSS, "divide_twice", "init_epoch", "softmax_twice"),
    "jocor": (*_SMALL_LOSS, "co_lambda"),
}
# The largest --seed and --noise_seed: NumPy's and Keras' global seeds are 32-bit.
MAX_SEED = 2**32 - 1
# The flags that only some dataset sources read; any other source refuses them.
DATASET_FLAGS = {
    "folder": ("image_size", "validation_split", "labels_csv", "skip_corrupt_images"),
    "clothing1m": ("image_size", "skip_corrupt_images"),
}
# Flags that may differ when a run resumes: where things are, how much is
# printed and logged, how often it checkpoints, the hardware it runs on and
# whether XLA compiles it, how many steps run per call (the same steps, bit for
# bit), and what a non-finite step does. Every other flag changes the run, or
# (`--train_fit`) the columns of history.csv, which a resumed run appends to.
RESUME_NEUTRAL = (
    "data_dir",
    "model_dir",
    "export_dir",
    "verbose",
    "log_every_steps",
    "checkpoint_every_steps",
    "steps_per_execution",
    "strategy",
    "jit_compile",
    "on_nonfinite",
    "new_run",
    "dry_run",
    # Read only after training, when label_issues.csv is written.
    "label_issue_probabilities",
    "label_quality_score",
    "label_issue_filter",
    "write_clean_labels",
    # Read only after training, when the export is calibrated.
    "calibrate",
)
# Exit statuses of the CLI besides 0 and 2 (bad input).
EXIT_TRAINING_FAULT = 3  # a non-finite step, or a checkpoint that could not be written


@dataclasses.dataclass
class TrainConfig:
    """Everything one run needs; field names equal the CLI flags."""

    method: str = _DEFAULTS["method"]
    dataset: str = _DEFAULTS["dataset"]
    data_dir: str | None = _DEFAULTS["data_dir"]
    noise_type: str = _DEFAULTS["noise_type"]
    noise_rate: float = _DEFAULTS["noise_rate"]
    noise_seed: int = _DEFAULTS["noise_seed"]
    seed: int = _DEFAULTS["seed"]
    backbone: str = _DEFAULTS["backbone"]
    student_backbone: str = _DEFAULTS["student_backbone"]
    backbone_width: int = _DEFAULTS["backbone_width"]
    hidden_units: int = _DEFAULTS["hidden_units"]
    pretrained_weights: str = _DEFAULTS["pretrained_weights"]
    image_size: tuple = _DEFAULTS["image_size"]
    validation_split: float = _DEFAULTS["validation_split"]
    noisy_validation_split: float = _DEFAULTS["noisy_validation_split"]
    labels_csv: str = _DEFAULTS["labels_csv"]
    skip_corrupt_images: bool = _DEFAULTS["skip_corrupt_images"]
    epochs: int = _DEFAULTS["epochs"]
    warmup_epochs: int = _DEFAULTS["warmup_epochs"]
    batch_size: int = _DEFAULTS["batch_size"]
    lr: float = _DEFAULTS["lr"]
    lr_decay_epochs: tuple = _DEFAULTS["lr_decay_epochs"]
    lr_decay_factor: float = _DEFAULTS["lr_decay_factor"]
    momentum: float = _DEFAULTS["momentum"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    weight_decay_mode: str = _DEFAULTS["weight_decay_mode"]
    tau: float = _DEFAULTS["tau"]
    epsilon: float = _DEFAULTS["epsilon"]
    update_rule: str = _DEFAULTS["update_rule"]
    random_update_prob: float = _DEFAULTS["random_update_prob"]
    sampling: str = _DEFAULTS["sampling"]
    masked_update: str = _DEFAULTS["masked_update"]
    agreement_granularity: str = _DEFAULTS["agreement_granularity"]
    augment: str = _DEFAULTS["augment"]
    train_student: bool = _DEFAULTS["train_student"]
    student_start: str = _DEFAULTS["student_start"]
    model_dir: str = _DEFAULTS["model_dir"]
    export_dir: str = _DEFAULTS["export_dir"]
    verbose: int = _DEFAULTS["verbose"]
    log_every_steps: int = _DEFAULTS["log_every_steps"]
    steps_per_execution: int = _DEFAULTS["steps_per_execution"]
    train_fit: bool = _DEFAULTS["train_fit"]
    dry_run: bool = _DEFAULTS["dry_run"]
    strategy: str = _DEFAULTS["strategy"]
    sync_batchnorm: bool = _DEFAULTS["sync_batchnorm"]
    mixed_precision: str = _DEFAULTS["mixed_precision"]
    jit_compile: str = _DEFAULTS["jit_compile"]
    deterministic: bool = _DEFAULTS["deterministic"]
    checkpoint_every_steps: int = _DEFAULTS["checkpoint_every_steps"]
    on_nonfinite: str = _DEFAULTS["on_nonfinite"]
    new_run: bool = _DEFAULTS["new_run"]
    forget_rate: float | None = _DEFAULTS["forget_rate"]
    num_gradual: int = _DEFAULTS["num_gradual"]
    forget_exponent: float = _DEFAULTS["forget_exponent"]
    co_lambda: float = _DEFAULTS["co_lambda"]
    init_epoch: int = _DEFAULTS["init_epoch"]
    divide_twice: bool = _DEFAULTS["divide_twice"]
    softmax_twice: bool = _DEFAULTS["softmax_twice"]
    label_issue_probabilities: str = _DEFAULTS["label_issue_probabilities"]
    label_quality_score: str = _DEFAULTS["label_quality_score"]
    label_issue_filter: str = _DEFAULTS["label_issue_filter"]
    write_clean_labels: str = _DEFAULTS["write_clean_labels"]
    calibrate: str = _DEFAULTS["calibrate"]


def config_problems(config):
    """Every problem of `config` that can be seen without loading data.

    Returns a list of messages, each naming the flag at fault and its valid range.
    """
    c = config
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    for field in dataclasses.fields(c):
        value = getattr(c, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            # inf passes "> 0" and would only fail at the first steps.
            problems.append(f"--{field.name}={value} must be a finite number.")
    for flag in ("seed", "noise_seed"):
        value = getattr(c, flag)
        need(
            0 <= value <= MAX_SEED,
            f"--{flag}={value} must be an integer in [0, 2**32 - 1].",
        )
    need(c.verbose in (0, 1, 2), f"--verbose={c.verbose} must be 0, 1 or 2.")
    problems += dataset_flag_problems(c)
    try:  # the name and its argument: no data is read, TensorFlow not loaded
        check_dataset_spec(c.dataset)
    except DatasetError as error:
        problems.append(f"--dataset: {error}")
    if c.method not in METHODS:
        problems.append(f"--method={c.method!r} is unknown; choose one of {METHODS}.")
    else:
        problems += method_flag_problems(c)
        problems += label_issue_problems(c)
    need(0.0 <= c.noise_rate < 1.0, f"--noise_rate={c.noise_rate} must be in [0, 1).")
    need(-1.0 <= c.tau <= 1.0, f"--tau={c.tau} must be in [-1, 1].")
    need(0.0 <= c.epsilon < 1.0, f"--epsilon={c.epsilon} must be in [0, 1).")
    need(c.batch_size >= 1, f"--batch_size={c.batch_size} must be >= 1.")
    need(c.epochs >= 1, f"--epochs={c.epochs} must be >= 1.")
    need(
        c.method != "gal" or 0 <= c.warmup_epochs <= c.epochs,
        f"--warmup_epochs={c.warmup_epochs} must be in [0, --epochs={c.epochs}].",
    )
    need(c.lr > 0, f"--lr={c.lr} must be > 0.")
    need(
        0 < c.lr_decay_factor <= 1,
        f"--lr_decay_factor={c.lr_decay_factor} must be in (0, 1].",
    )
    need(
        len(set(map(int, c.lr_decay_epochs))) == len(c.lr_decay_epochs),
        f"--lr_decay_epochs={','.join(map(str, c.lr_decay_epochs))} names an "
        "epoch twice; list each decay epoch once.",
    )
    need(
        all(0 < int(e) < c.epochs for e in c.lr_decay_epochs),
        f"--lr_decay_epochs={','.join(map(str, c.lr_decay_epochs))} must lie in "
        f"(0, --epochs={c.epochs}).",
    )
    need(c.momentum >= 0, f"--momentum={c.momentum} must be >= 0.")
    need(c.weight_decay >= 0, f"--weight_decay={c.weight_decay} must be >= 0.")
    need(
        0.0 <= c.random_update_prob <= 1.0,
        f"--random_update_prob={c.random_update_prob} must be in [0, 1].",
    )
    need(
        c.backbone_width >= 0,
        f"--backbone_width={c.backbone_width} must be >= 0 (0: the backbone's own).",
    )
    need(c.hidden_units >= 0, f"--hidden_units={c.hidden_units} must be >= 0.")
    kinds = {c.backbone, c.student_backbone or c.backbone}
    need(
        not c.hidden_units or kinds == {"small_cnn"},
        f"--hidden_units={c.hidden_units} applies to small_cnn only; the backbones "
        f"are {sorted(kinds)}.",
    )
    need(
        not c.backbone_width or "resnet50" not in kinds,
        "--backbone_width does not apply to resnet50 (keras.applications' own).",
    )
    need(
        not c.pretrained_weights or "resnet50" in kinds,
        f"--pretrained_weights applies to resnet50 only; the backbones are "
        f"{sorted(kinds)}.",
    )
    need(
        c.pretrained_weights in ("", "imagenet")
        or os.path.isfile(c.pretrained_weights),
        f"--pretrained_weights={c.pretrained_weights} must be 'imagenet' or an "
        f"existing weights file.",
    )
    need(
        c.log_every_steps >= 1,
        f"--log_every_steps={c.log_every_steps} must be >= 1.",
    )
    need(
        len(c.image_size) in (0, 2)
        and all(str(d).isdigit() and int(d) > 0 for d in c.image_size),
        f"--image_size={','.join(map(str, c.image_size))} must be empty or H,W > 0.",
    )
    need(
        0.0 < c.validation_split < 1.0,
        f"--validation_split={c.validation_split} must be in (0, 1).",
    )
    need(
        0.0 <= c.noisy_validation_split < 1.0,
        f"--noisy_validation_split={c.noisy_validation_split} must be in [0, 1): "
        "the share of the noisy training set held out for model selection and "
        "calibration (0: none).",
    )
    need(
        not c.labels_csv or os.path.isfile(c.labels_csv),
        f"--labels_csv={c.labels_csv} does not exist.",
    )
    for flag, value, allowed in (
        ("noise_type", c.noise_type, NOISE_TYPES),
        ("backbone", c.backbone, BACKBONES),
        ("student_backbone", c.student_backbone or c.backbone, BACKBONES),
        ("update_rule", c.update_rule, UPDATE_RULES),
        ("sampling", c.sampling, SAMPLING_MODES),
        ("masked_update", c.masked_update, MASKED_UPDATES),
        ("agreement_granularity", c.agreement_granularity, GRANULARITIES),
        ("augment", c.augment, AUGMENTATIONS),
        ("weight_decay_mode", c.weight_decay_mode, WEIGHT_DECAY_MODES),
        ("strategy", c.strategy, STRATEGIES),
        ("mixed_precision", c.mixed_precision, MIXED_PRECISION),
        ("jit_compile", c.jit_compile, JIT_COMPILE),
        ("student_start", c.student_start, STUDENT_STARTS),
        ("on_nonfinite", c.on_nonfinite, ON_NONFINITE),
        ("calibrate", c.calibrate, CALIBRATIONS),
    ):
        need(
            value in allowed, f"--{flag}={value!r} is unknown; choose one of {allowed}."
        )
    need(
        c.checkpoint_every_steps >= 0,
        f"--checkpoint_every_steps={c.checkpoint_every_steps} must be >= 0 "
        "(0: a checkpoint at the end of every epoch only).",
    )
    problems += steps_per_execution_problems(c)
    chief = True
    if c.strategy == "multi_worker":
        problem = tf_config_problem(os.environ.get("TF_CONFIG"))
        need(problem is None, f"--strategy=multi_worker: {problem}")
        chief = problem is not None or tf_config_is_chief(os.environ["TF_CONFIG"])
    if chief and not c.dry_run:
        problems += foreign_directory_problems(c.model_dir)
        if not c.new_run:
            problems += resume_problems(c)
    return problems


def steps_per_execution_problems(config, steps_per_epoch=None):
    """Why `--steps_per_execution` cannot be honoured: Python runs only between
    calls of k steps, so logged and checkpointed steps must be multiples of k,
    and k must divide the steps of an epoch (`steps_per_epoch`, when known),
    since Keras draws k batches per call whatever the epoch has left."""
    c, k = config, config.steps_per_execution
    if k < 1:
        return [f"--steps_per_execution={k} must be >= 1."]
    problems = []
    if c.checkpoint_every_steps % k:
        problems.append(
            f"--checkpoint_every_steps={c.checkpoint_every_steps} must be a "
            f"multiple of --steps_per_execution={k}: checkpoints are written "
            f"between calls of {k} steps."
        )
    if c.method == "gal" and c.log_every_steps % k:
        problems.append(
            f"--log_every_steps={c.log_every_steps} must be a multiple of "
            f"--steps_per_execution={k}: a step's own values are read between "
            f"calls of {k} steps."
        )
    if steps_per_epoch is not None and steps_per_epoch % k:
        problems.append(
            f"--steps_per_execution={k} must divide the {steps_per_epoch} steps "
            "of an epoch: a call of k steps would run past the epoch's end. "
            "Choose a divisor of it, or another --batch_size."
        )
    return problems


def method_flag_problems(config):
    """The problems of the flags of `config.method`: flags of other methods set
    away from their defaults, and the forget-rate flags' values."""
    c = config
    problems = [
        f"--{flag} does not apply to --method={c.method} (only to "
        + ", ".join(m for m, used in METHOD_FLAGS.items() if flag in used)
        + "); remove it."
        for flag in sorted({f for used in METHOD_FLAGS.values() for f in used})
        if flag not in METHOD_FLAGS[c.method] and getattr(c, flag) != _DEFAULTS[flag]
    ]
    if "forget_rate" not in METHOD_FLAGS[c.method]:
        return problems
    if c.forget_rate is not None and not 0.0 <= c.forget_rate < 1.0:
        problems.append(f"--forget_rate={c.forget_rate} must be in [0, 1).")
    if c.forget_rate is None and (
        c.noise_type in REAL_NOISE_TYPES or c.noise_type == "none"
    ):
        # No synthetic noise: the labels are as given (Animal-10N, Clothing1M,
        # CIFAR-N, your own), so their noise rate is unknown here.
        kind = "real noise" if c.noise_type != "none" else "the labels as given"
        problems.append(
            f"--method={c.method} needs a forget rate, and --noise_type="
            f"{c.noise_type} leaves {kind}, of unknown noise rate: pass "
            "--forget_rate (your estimate of the noise rate, in [0, 1); 0 for "
            "clean labels)."
        )
    if c.num_gradual < 0:
        problems.append(f"--num_gradual={c.num_gradual} must be >= 0.")
    if not c.forget_exponent > 0:
        problems.append(f"--forget_exponent={c.forget_exponent} must be > 0.")
    if not 0.0 <= c.co_lambda <= 1.0:
        problems.append(f"--co_lambda={c.co_lambda} must be in [0, 1].")
    if c.init_epoch < 0:
        problems.append(f"--init_epoch={c.init_epoch} must be >= 0.")
    return problems


def label_issue_problems(config):
    """Problems of the label-issue flags (`config.method` is known)."""
    c, problems = config, []
    choices = ("auto", *LABEL_ISSUE_NETWORKS[c.method])
    if c.label_issue_probabilities not in choices:
        problems.append(
            f"--label_issue_probabilities={c.label_issue_probabilities!r}: "
            f"--method={c.method} has {choices}; choose one of those."
        )
    elif (
        c.method == "gal"
        and label_issue_network(c) in UNTRAINED_WITHOUT
        and not _trains(c, label_issue_network(c))
    ):
        problems.append(
            f"--label_issue_probabilities={c.label_issue_probabilities}: that "
            "network is not trained in this run "
            f"({UNTRAINED_WITHOUT[label_issue_network(c)]}); choose another."
        )
    if c.label_quality_score not in LABEL_QUALITY_SCORES:
        problems.append(
            f"--label_quality_score={c.label_quality_score!r} is unknown; choose "
            f"one of {LABEL_QUALITY_SCORES}."
        )
    if c.label_issue_filter not in LABEL_ISSUE_FILTERS:
        problems.append(
            f"--label_issue_filter={c.label_issue_filter!r} is unknown; choose one "
            f"of {LABEL_ISSUE_FILTERS}."
        )
    if c.write_clean_labels and c.write_clean_labels not in CLEAN_LABEL_MODES:
        problems.append(
            f"--write_clean_labels={c.write_clean_labels!r} is unknown; choose one "
            f"of {CLEAN_LABEL_MODES}, or leave it empty."
        )
    elif c.write_clean_labels and not c.dataset.startswith("folder:"):
        problems.append(
            f"--write_clean_labels writes a --labels_csv file for folder: "
            f"datasets; --dataset={c.dataset} is not one. Use label_issues.csv "
            "(its index column) to clean other data."
        )
    return problems


# GAL's networks that a run may leave untrained, and why.
UNTRAINED_WITHOUT = {
    "student": "--notrain_student, or --student_start=split with a warm-up "
    "lasting every epoch",
    "twin_b": "the warm-up lasts every epoch",
    "joint": "the warm-up lasts every epoch",
}


def _trains(config, network):
    """Whether GAL's `network` is trained by the run `config` describes."""
    split = config.warmup_epochs < config.epochs
    if network == "student":
        return config.train_student and (config.student_start != "split" or split)
    return split


def label_issue_network(config):
    """The network whose training-set probabilities score label issues:
    `--label_issue_probabilities`, or for `auto` GAL's θC (it found the flipped
    labels better than the twins' joint prediction in 5 of the 6 settings of
    `benchmarks/label_issues.py`; without θC the twins' joint prediction, or θA
    before the split), the two-network peers' joint prediction and CE's one
    network."""
    if config.label_issue_probabilities != "auto":
        return config.label_issue_probabilities
    if config.method == "ce":
        return "net"
    if config.method == "gal":
        if _trains(config, "student"):
            return "student"
        if config.warmup_epochs >= config.epochs:
            return "twin_a"
    return "joint"


def method_forget_rate(config):
    """The forget rate τ_f of a small-loss method: `--forget_rate`, else the
    synthetic noise rate, halved for `asym` (whose flips touch half of the
    classes, so its effective rate is about r/2, as JoCoR's official code
    sets it)."""
    if config.forget_rate is not None:
        return config.forget_rate
    if config.noise_type == "asym":
        return config.noise_rate / 2
    return config.noise_rate


def dataset_flag_problems(config):
    """Flags given a value (not their default) for a dataset that has no use for
    them: refused, since a silently ignored flag misleads."""
    source = config.dataset.partition(":")[0]
    used = DATASET_FLAGS.get(source, ())
    return [
        f"--{flag} does not apply to --dataset={config.dataset} (only to "
        + " and ".join(
            sorted(name for name, flags_ in DATASET_FLAGS.items() if flag in flags_)
        )
        + "); remove it."
        for flag in sorted({f for flags_ in DATASET_FLAGS.values() for f in flags_})
        if flag not in used and getattr(config, flag) != _DEFAULTS[flag]
    ]


def resume_problems(config):
    """Why `config.model_dir` cannot be resumed with `config` (empty when it can,
    or when it holds no run yet)."""
    directory = config.model_dir
    started = os.path.join(directory or "", "config.json")
    if not directory or not os.path.isfile(started):
        return []
    try:
        with open(started) as f:
            before = json.load(f)
    except (OSError, ValueError) as error:
        return [f"{started} is unreadable ({error}); cannot resume that run."]
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    # A flag missing from config.json is younger than the run, which therefore
    # ran with the flag's default (new flags default to the old behaviour).
    defaults = json.loads(json.dumps(_DEFAULTS))
    changed = [
        f"  --{name}: {before.get(name, defaults[name])!r} when the run started, "
        f"now {now[name]!r}"
        for name in now
        if name not in RESUME_NEUTRAL and before.get(name, defaults[name]) != now[name]
    ]
    if not changed:
        return []
    return [
        f"--model_dir={directory} holds a run started with other flags; resuming "
        "it with these would make a different run:\n"
        + "\n".join(changed)
        + "\nRe-run with the original flags to resume it, or add --new_run to "
        "start a new run in a new directory."
    ]


def run_name(config, dataset_name):
    rate = round(config.noise_rate * 100)
    return f"{dataset_name}_{config.noise_type}{rate}_s{config.seed}"


def run(config):
    """Trains `config.method` as `config` says and returns the run summary (a dict).

    Steps: validate, load the data and make its noisy labels, build the method's
    networks and their optimizers, `fit` with per-epoch evaluation, then write
    `summary.json`, the history CSV and the noisy labels to `model_dir`, and export
    the reported network (θC for GAL) as the next SavedModel version under
    `export_dir`.

    A `model_dir` holding an unfinished run with the same flags is resumed from
    its latest checkpoint; one holding a finished run is not retrained (the
    stored summary is returned, with `already_finished` set).

    Raises:
        ConfigError: bad configuration or data, a `model_dir` that holds another
            run or is in use, always before any training.
        galkeras.checkpointing.Preempted: SIGTERM; a checkpoint was saved.
        galkeras.model.NonFiniteError: a non-finite step (`on_nonfinite=stop`).
        galkeras.checkpointing.CheckpointWriteError: a checkpoint write failed.
    """
    # Before any other TensorFlow op: a multi-worker strategy configures the
    # collective runtime, which must happen at program start-up.
    strategy = make_strategy(config.strategy)
    from galkeras.checkpointing import (
        CheckpointWriteError,
        Interrupted,
        Preempted,
        RunInUse,
    )
    from galkeras.model import NonFiniteError

    if config.deterministic:
        import tensorflow as tf

        # Seeds alone leave some kernels free to reorder floating-point sums;
        # this makes every op deterministic (or raise where it cannot be).
        tf.config.experimental.enable_op_determinism()
    try:
        prepared = _prepare(config, is_chief(strategy))
    except run_directory.RunFinished as finished:
        return {**finished.summary, "already_finished": str(finished)}
    except (ValueError, RunInUse) as error:  # includes DatasetError
        raise ConfigError(str(error)) from error
    model_dir, lock = prepared.model_dir, prepared.lock
    scratch = config.dry_run or lock is None  # a temporary directory
    if config.dry_run:
        config = dry_run_config(config)
    try:
        summary = _train(config, strategy, prepared)
    except (Preempted, Interrupted, NonFiniteError, CheckpointWriteError) as fault:
        # The message of a fault that leaves a resumable run names the directory
        # to resume, which the command line may not (--new_run, no --model_dir).
        fault.model_dir = model_dir
        raise
    finally:
        if lock is not None:
            lock.release()
        if scratch:
            shutil.rmtree(model_dir, ignore_errors=True)
    if scratch:  # removed: a worker's run is the chief's, in --model_dir
        summary["model_dir"] = None if config.dry_run else config.model_dir or None
    return summary


def dry_run_config(config):
    """The config of a dry run: one warm-up step, then (when the run has an
    agreement phase) one agreement step (a peer: two steps; Co-teaching+ one of
    each of its phases), on one batch of at most `DRY_RUN_BATCH` stand-in images
    (the code paths do not depend on the batch size, and a dry run should take
    seconds)."""
    # A peer always gets two epochs (Co-teaching+ changes phase between them).
    agreement = config.method != "gal" or config.warmup_epochs < config.epochs
    warmup = min(config.warmup_epochs, 1)
    return dataclasses.replace(
        config,
        # Co-teaching+ reaches its disagreement phase in the second epoch.
        init_epoch=min(config.init_epoch, 1),
        batch_size=min(config.batch_size, DRY_RUN_BATCH),
        epochs=warmup + 1 if agreement else 1,
        warmup_epochs=warmup if agreement else 1,
        lr_decay_epochs=(),
        log_every_steps=1,
        # One step per epoch: nothing to run in one call.
        steps_per_execution=1,
    )


class ConfigError(ValueError):
    """A bad flag or bad data, found before any training started."""


@dataclasses.dataclass
class Prepared:
    """What `_prepare` found: the data, its labels and split, and where the run
    goes (`lock` held on a chief's real run, else None)."""

    data: object
    noisy: object
    clean: object
    train_ids: object
    heldout_ids: object
    noise_rate_actual: float | None
    model_dir: str
    export_dir: str | None
    lock: object = None

    @property
    def trains_on_all(self):
        return len(self.train_ids) == len(self.noisy)


@dataclasses.dataclass
class TrainingData:
    """A run's data: the dataset, its noisy (and clean) training labels, and the
    split of `--noisy_validation_split`."""

    data: object
    noisy: object
    clean: object
    train_ids: object
    heldout_ids: object
    noise_rate_actual: float | None


def load_training_data(config):
    """Loads `config`'s dataset and makes its training labels and split, as a
    run (or its resume) does; raises on bad data."""
    from galkeras.datasets import check_dataset_spec, load_dataset
    from galkeras.datasets.base import stand_in_dataset

    check_dataset_spec(config.dataset)
    options = dict(
        data_dir=config.data_dir,
        image_size=tuple(int(d) for d in config.image_size) or None,
        validation_split=config.validation_split,
        labels_csv=config.labels_csv or None,
        skip_corrupt_images=config.skip_corrupt_images,
        seed=config.seed,
    )
    if config.dry_run:
        data = stand_in_dataset(
            config.dataset, min(config.batch_size, DRY_RUN_BATCH), **options
        )
    else:
        data = load_dataset(config.dataset, **options)
    noisy, clean = training_labels(data, config)
    noise_rate_actual = (
        noise.actual_noise_rate(clean, noisy) if clean is not None else None
    )
    split = heldout_split(config, data, noisy)
    return TrainingData(data, noisy, clean, *split, noise_rate_actual)


def config_of_run(model_dir):
    """The `TrainConfig` a run in `model_dir` started with (its `config.json`,
    today's defaults for flags younger than the run)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        saved = json.load(f)
    values = {**_DEFAULTS, **{k: v for k, v in saved.items() if k in _DEFAULTS}}
    for name in ("image_size", "lr_decay_epochs"):
        values[name] = tuple(values[name])
    return TrainConfig(**values)


def _prepare(config, chief=True):
    """Validation and data loading: everything that can fail on bad input."""
    problems = config_problems(config)
    if problems:
        raise ValueError("\n".join(problems))

    from galkeras import checkpointing, export

    loaded = load_training_data(config)
    data, split = loaded.data, (loaded.train_ids, loaded.heldout_ids)
    if config.batch_size > len(split[0]) and not config.dry_run:
        left = " left after --noisy_validation_split" if len(split[1]) else ""
        raise ValueError(
            f"--batch_size={config.batch_size} exceeds the {len(split[0])} training "
            f"images of {data.name}{left}."
        )
    steps_per_epoch = -(-len(split[0]) // config.batch_size)
    problems = steps_per_execution_problems(config, steps_per_epoch)
    if problems and not config.dry_run:
        raise ValueError("\n".join(problems))

    name = run_name(config, data.name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    model_dir = config.model_dir or os.path.join("runs", f"{name}-{stamp}")
    export_dir = config.export_dir or os.path.join("saved_models", name)
    lock = None
    if not chief and not config.dry_run and config.model_dir:
        run_directory.refuse_finished(
            config.model_dir
        )  # the chief's, on the shared --model_dir
    if config.dry_run or not chief:  # writes nothing where a real run would
        kind = "dry-run" if config.dry_run else "worker"
        model_dir = tempfile.mkdtemp(prefix=f"galkeras-{kind}-{name}-")
        export_dir = None
    else:
        if not config.model_dir:
            model_dir = run_directory.unused_directory(model_dir)
        elif config.new_run and run_directory.holds_a_run(model_dir):
            model_dir = run_directory.unused_directory(
                f"{model_dir.rstrip(os.sep)}-{stamp}"
            )
            logging.warning("--new_run: this run goes to %s.", model_dir)
        run_directory.refuse_finished(model_dir)
        checkpointing.check_writable(model_dir, "--model_dir")
        export.check_export_base(export_dir)
        lock = checkpointing.RunLock(model_dir).acquire()
    return Prepared(
        data,
        loaded.noisy,
        loaded.clean,
        *split,
        loaded.noise_rate_actual,
        model_dir,
        export_dir,
        lock,
    )


def heldout_split(config, data, noisy):
    """`(train_ids, heldout_ids)` of `--noisy_validation_split` over the noisy
    training set (`training_set.noisy_holdout_split`, under `--seed`).

    Raises:
        DatasetError: naming each class left without a training or a held-out
            sample. A dry run's few stand-in images cannot be split: it trains on
            all of them and evaluates the held-out path on all of them too.
    """
    import numpy as np

    from galkeras.datasets import DatasetError
    from galkeras.training_set import holdout_problems, noisy_holdout_split

    fraction = config.noisy_validation_split
    train_ids, heldout_ids = noisy_holdout_split(noisy, fraction, config.seed)
    if not fraction:
        return train_ids, heldout_ids
    problems = holdout_problems(noisy, heldout_ids, data.class_names)
    if problems and config.dry_run:
        everything = np.arange(len(noisy), dtype=np.int64)
        return everything, everything
    if problems:
        raise DatasetError(
            f"--noisy_validation_split={fraction} leaves classes of {data.name} "
            "without a training or a held-out sample (class j holds out "
            "round(f * n_j) of its n_j samples):\n  "
            + "\n  ".join(problems)
            + "\nChoose a --noisy_validation_split that holds out at least one "
            "sample of every class, or 0 to hold out none."
        )
    return train_ids, heldout_ids


def _subset(images, ids):
    """`images[ids]`: an array's rows, or an `ImageFiles`' files (undecoded)."""
    return images.subset(ids) if hasattr(images, "subset") else images[ids]


def _train(config, strategy, prepared):
    """The run, under the seed and the mixed-precision policy: build the method,
    restore its checkpoint, fit, then export and summarise."""
    import keras

    keras.utils.set_random_seed(config.seed)
    policy = keras.mixed_precision.global_policy()
    if config.mixed_precision != "none":
        # Layers compute in 16 bits and keep float32 variables; logits, losses
        # and the agreement math stay float32.
        keras.mixed_precision.set_global_policy(f"mixed_{config.mixed_precision}")
    try:
        with strategy.scope():
            method, training_set = build_run(config, prepared)
        try:
            run_directory.write_run_record(
                prepared.model_dir,
                config,
                prepared.noisy,
                prepared.clean,
                prepared.heldout_ids,
            )
        except run_directory.RunRecordMismatch as error:
            raise ConfigError(str(error)) from error
        run_checkpoint, start_step = _restore(
            config, strategy, method, training_set, prepared.model_dir
        )
        started = time.time()
        saver = _fit(
            config, strategy, method, training_set, run_checkpoint, start_step, prepared
        )
        seconds = time.time() - started
        return _export_and_summarise(
            config, method, training_set, saver, start_step, seconds, prepared
        )
    finally:
        keras.mixed_precision.set_global_policy(policy)


def build_run(config, prepared):
    """The compiled method and its `TrainingSet` (inside the strategy's scope)."""
    from galkeras import augment, backbones, optimizers
    from galkeras.training_set import TrainingSet

    data = prepared.data

    def make(name, kind):
        weights = (
            (config.pretrained_weights or None)
            if kind == "resnet50" and not config.dry_run
            else None
        )
        try:
            net = backbones.build_backbone(
                kind,
                data.image_shape,
                data.num_classes,
                data.mean,
                data.std,
                width=config.backbone_width or None,
                hidden_units=config.hidden_units,
                # A dry run downloads nothing: pretrained weights are not loaded.
                weights=weights,
                name=name,
            )
        except (OSError, ValueError) as error:
            if weights in (None, "imagenet"):
                raise
            raise ConfigError(
                f"--pretrained_weights={weights} could not be loaded into "
                f"ResNet-50 ({error}). Give a Keras weights file of the "
                "top-less ResNet-50 (include_top=False), or 'imagenet'."
            ) from error
        if config.sync_batchnorm:
            net = backbones.synchronize_batchnorm(net)
        return net

    method = build_method(config, make)
    # The held-out samples are never trained on: not in the batches, not in
    # θC's pseudo-label table, not in its statistics.
    ids, whole = prepared.train_ids, prepared.trains_on_all
    clean = prepared.clean
    training_set = TrainingSet(
        data.x_train if whole else _subset(data.x_train, ids),
        prepared.noisy[ids],
        batch_size=config.batch_size,
        sampling=config.sampling,
        seed=config.seed,
        augment=augment.make_augment(_augment_kind(config, data), data.image_shape),
        clean_labels=clean if clean is None or whole else clean[ids],
        num_classes=data.num_classes,
    )
    schedule = optimizers.piecewise_epoch_schedule(
        config.lr,
        config.lr_decay_epochs,
        config.lr_decay_factor,
        training_set.steps_per_epoch,
    )
    method.compile(
        optimizer=optimizers.SGD(
            schedule,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            weight_decay_mode=config.weight_decay_mode,
        ),
        steps_per_execution=config.steps_per_execution,
        jit_compile=JIT_COMPILE_VALUES[config.jit_compile],
    )
    try:  # lowered to XLA, not run: an op XLA lacks is named before training
        method.check_xla(data.image_shape)
    except ValueError as error:
        raise ConfigError(f"--jit_compile={config.jit_compile}: {error}") from error
    if config.method == "gal":
        method.ensure_pseudo_label_table(training_set.num_examples, data.num_classes)
    return method, training_set


def _restore(config, strategy, method, training_set, model_dir):
    """`(run_checkpoint, start_step)`: the run's checkpoint, restored."""
    from galkeras import checkpointing

    run_checkpoint = checkpointing.RunCheckpoint(
        method,
        os.path.join(model_dir, checkpointing.CHECKPOINT_DIR),
        training_set.labels,
    )
    # Non-chief workers of a multi-worker run write to a temporary directory and
    # resume from the chief's checkpoints (--model_dir on storage they all see).
    shared = None
    if not is_chief(strategy) and config.model_dir:
        shared = os.path.join(config.model_dir, checkpointing.CHECKPOINT_DIR)
    try:
        start_step = run_checkpoint.restore(
            shared if shared and os.path.isdir(shared) else None
        )
    except checkpointing.CheckpointMismatch as error:  # e.g. TrainingSetChanged
        raise ConfigError(str(error)) from error
    if strategy.extended._in_multi_worker_mode():
        starts = steps_of_all_workers(strategy, start_step)
        if len(set(starts)) > 1:
            raise ConfigError(
                f"The workers resumed from different steps {starts}: every worker "
                f"must read the chief's checkpoints in --model_dir={config.model_dir} "
                "(put it on storage all hosts share)."
            )
    steps = training_set.steps_per_epoch
    if start_step:
        epoch, step = divmod(start_step, steps)
        logging.warning(
            "Resuming %s from %s: %d of %d epochs and %d of %d steps done.",
            model_dir,
            run_checkpoint.latest or shared,
            epoch,
            config.epochs,
            step,
            steps,
        )
    return run_checkpoint, start_step


def _fit(config, strategy, method, training_set, run_checkpoint, start_step, prepared):
    """Trains from `start_step` to the end with the run's evaluations, logs and
    checkpoints; returns the `CheckpointCallback`."""
    from galkeras import checkpointing, run_logging
    from galkeras.model import NonFiniteError

    model_dir, steps = prepared.model_dir, training_set.steps_per_epoch
    # Also at step 0: a run that died before its first checkpoint may have
    # logged rows that it is about to write again.
    run_logging.truncate_logs(model_dir, start_step, steps)
    saver = checkpointing.CheckpointCallback(
        run_checkpoint,
        method,
        steps,
        every_n_steps=config.checkpoint_every_steps,
        cluster_resolver=getattr(strategy, "cluster_resolver", None),
    )
    validation, callbacks = _evaluation_and_logs(config, method, prepared, training_set)
    # Last, so that an epoch's logs are written before its checkpoint.
    callbacks.append(saver)
    try:
        if start_step < config.epochs * steps:
            method.fit(
                training_set,
                epochs=config.epochs,
                initial_step=start_step,
                validation_data=validation,
                callbacks=callbacks,
                verbose=config.verbose,
            )
    except NonFiniteError as error:
        error.args = (
            f"{error} The last checkpoint, {run_checkpoint.latest or '(none yet)'}, "
            "was written before that step and is intact; re-running with "
            "--on_nonfinite=skip_step resumes from it.",
        )
        raise
    except KeyboardInterrupt as interrupt:
        raise checkpointing.Interrupted(run_checkpoint.latest_on_disk) from interrupt
    finally:
        saver.close()
    return saver


def _evaluation_and_logs(config, method, prepared, training_set):
    """`(validation_data, callbacks)`: the test split (or the clean validation
    split, with the test split beside it), the noisy held-out split, with
    `--train_fit` the fit of `training_set`, and the run's logs."""
    import keras

    from galkeras import run_logging, sampling

    data, model_dir = prepared.data, prepared.model_dir
    test = sampling.evaluation_dataset(data.x_test, data.y_test, config.batch_size)
    callbacks = [keras.callbacks.CSVLogger(_history_csv(model_dir), append=True)]
    if config.method == "gal":
        callbacks += [
            per_variable_agreement_logger(
                method, os.path.join(model_dir, "agreement_per_variable.csv")
            ),
            run_logging.RunLogger(
                method,
                os.path.join(model_dir, "tensorboard"),
                steps_csv=os.path.join(model_dir, "steps.csv"),
                every_n_steps=config.log_every_steps,
            ),
        ]
    else:
        callbacks.append(
            keras.callbacks.TensorBoard(
                os.path.join(model_dir, "tensorboard"), write_graph=False
            )
        )
    validation = test
    if data.x_val is not None:
        # Model selection on the clean validation split (Clothing1M's protocol):
        # Keras' validation is the validation split, and the test split is
        # evaluated beside it every epoch under `test_*` keys.
        validation = sampling.evaluation_dataset(
            data.x_val, data.y_val, config.batch_size
        )
        callbacks.insert(0, run_logging.EvaluateTestSplit(method, test))
    if len(prepared.heldout_ids):
        # Model selection without clean data: the held-out samples against
        # their noisy labels, under `heldout_*` keys.
        ids = prepared.heldout_ids
        heldout = sampling.evaluation_dataset(
            _subset(data.x_train, ids), prepared.noisy[ids], config.batch_size
        )
        callbacks.insert(
            0, run_logging.EvaluateTestSplit(method, heldout, prefix=HELDOUT_PREFIX)
        )
    if config.train_fit:
        # Opt-in: one more inference pass over the training set every epoch,
        # which a timed run should not pay.
        callbacks.insert(0, run_logging.EvaluateTrainingFit(method, training_set))
    return validation, callbacks


def _history_csv(model_dir):
    return os.path.join(model_dir, "history.csv")


def _export_and_summarise(
    config, method, training_set, saver, start_step, seconds, prepared
):
    """Exports the reported network and writes `summary.json`; returns it."""
    from galkeras import export, run_logging

    model_dir, export_dir = prepared.model_dir, prepared.export_dir
    # The whole run's epochs, including those before a resume.
    history = run_logging.read_history_csv(_history_csv(model_dir))
    # The reported network is exported for serving, and saved as a .keras file
    # for reloading in Keras: θC for GAL, θA for GAL-as-CE, the twins' joint
    # prediction for a run without θC, a peer's reported network.
    reported = reported_network(config)
    temperature, calibration = _calibrate(config, method, prepared, reported)
    export_path = keras_path = None
    if export_dir is not None:  # not on a dry run, not on a non-chief worker
        served = method.classifier(reported)
        # Written under a temporary name, then renamed: never half a file. The
        # .keras file keeps the network uncalibrated; the export divides its
        # logits by the temperature.
        keras_path = os.path.join(model_dir, f"{reported}.keras")
        served.save(keras_path + ".partial.keras")
        os.replace(keras_path + ".partial.keras", keras_path)
        export_path = export.export_classifier(
            served, export_dir, prepared.data.class_names, temperature=temperature
        )
    issues = _write_label_issues(config, method, prepared)
    trained_epochs = config.epochs - start_step / training_set.steps_per_epoch
    summary = summarise(history, config.warmup_epochs, reported)
    summary.update(
        {
            "train_examples": training_set.num_examples,
            "heldout_examples": len(prepared.heldout_ids),
            "dataset": prepared.data.name,
            "noise_type": config.noise_type,
            "noise_rate": config.noise_rate,
            "noise_rate_actual": prepared.noise_rate_actual,
            "epochs": config.epochs,
            # Of the epochs trained by this process (all, unless resumed).
            "seconds_per_epoch": seconds / trained_epochs if trained_epochs else None,
            "resumed_from_step": start_step,
            "nonfinite_steps": int(method.nonfinite_steps.numpy()),
            "cdas_fallbacks": saver.cdas_fallbacks(),
            "skipped_images": prepared.data.skipped_images,
            "reported_network": reported,
            "dry_run": config.dry_run,
            "model_dir": model_dir,
            "export_path": export_path,
            "keras_path": keras_path,
            "label_issues": issues,
            "calibration": calibration,
        }
    )
    # summary.json marks the run finished: it appears whole or not at all.
    summary_path = os.path.join(model_dir, "summary.json")
    with open(summary_path + ".partial", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(summary_path + ".partial", summary_path)
    return summary


def _calibrate(config, method, prepared, reported):
    """`(temperature, entry)`: each network's ECE and NLL on the clean test
    split, and the temperature the reported network is served with under
    `--calibrate` (fitted on the noisy held-out split, else the training set),
    as `galkeras.calibration.calibrate_method` computes them; `entry` is
    `summary.json`'s `calibration`. Every worker computes it (the inference is
    spread over all of them)."""
    from galkeras import calibration

    result, entry = calibration.calibrate_method(
        method,
        LABEL_ISSUE_NETWORKS[config.method],
        reported,
        prepared.data,
        prepared.noisy,
        heldout_ids=() if prepared.trains_on_all else prepared.heldout_ids,
        calibration=config.calibrate,
        noise_type=config.noise_type,
        noise_rate=config.noise_rate,
        batch_size=max(config.batch_size, 256),
    )
    return result.temperature, entry


def _write_label_issues(config, method, prepared):
    """Scores every training-split sample's label under the trained networks
    (held-out samples too, out-of-sample) and writes `label_issues.csv`, and
    with `--write_clean_labels` the cleaned `labels.csv`, in the run directory.
    Returns the summary's `label_issues` entry (None on a non-chief worker, which
    computes its share and writes nothing)."""
    from galkeras import label_issues

    data = prepared.data
    network = label_issue_network(config)
    probabilities = label_issues.network_probabilities(
        method, network, data.x_train, batch_size=max(config.batch_size, 256)
    )
    if prepared.export_dir is None and not config.dry_run:
        return None
    issues = label_issues.find_label_issues(
        probabilities,
        prepared.noisy,
        score=config.label_quality_score,
        filter_by=config.label_issue_filter,
        heldout_ids=() if prepared.trains_on_all else prepared.heldout_ids,
        paths=data.train_paths,
    )
    # The run's own files: a run is written once, and a finished one is never
    # trained again, so these replace only what a run cut short had written.
    path = label_issues.write_label_issues(
        os.path.join(prepared.model_dir, label_issues.FILE_NAME),
        issues,
        data.class_names,
        overwrite=True,
    )
    entry = {
        "path": path,
        "issues": int(issues.is_issue.sum()),
        "samples": len(issues.is_issue),
        "probabilities": network,
        "score": config.label_quality_score,
        "filter": config.label_issue_filter,
    }
    if config.write_clean_labels:
        entry["clean_labels"] = config.write_clean_labels
        entry["clean_labels_path"] = label_issues.write_clean_labels_csv(
            os.path.join(prepared.model_dir, label_issues.CLEAN_LABELS_FILE),
            issues,
            config.write_clean_labels,
            data.class_names,
            # A second round of cleaning keeps what the first one dropped.
            dropped_before=(
                label_issues.dropped_paths(config.labels_csv)
                if config.labels_csv
                else ()
            ),
            overwrite=True,
        )
    return entry


def build_method(config, make):
    """The `keras.Model` of `config.method` over networks from `make(name, kind)`.

    The networks are made in a fixed order after the seed is set, so the first
    network of every method starts from the same weights (CE's network is GAL's
    θA).
    """
    from galkeras import methods
    from galkeras.model import GAL

    if config.method == "gal":
        return GAL(
            make("twin_a", config.backbone),
            make("twin_b", config.backbone),
            make("student", config.student_backbone or config.backbone),
            warmup_epochs=config.warmup_epochs,
            tau=config.tau,
            epsilon=config.epsilon,
            update_rule=config.update_rule,
            random_update_prob=config.random_update_prob,
            masked_update=config.masked_update,
            agreement_granularity=config.agreement_granularity,
            train_student=config.train_student,
            student_start=config.student_start,
            seed=config.seed,
            on_nonfinite=config.on_nonfinite,
        )
    kind = methods.BY_NAME[config.method]
    options = {
        flag: getattr(config, flag)
        for flag in METHOD_FLAGS[config.method]
        if flag not in _SMALL_LOSS
    }
    if "forget_rate" in METHOD_FLAGS[config.method]:
        options.update(
            forget_rate=method_forget_rate(config),
            num_gradual=config.num_gradual,
            exponent=config.forget_exponent,
        )
    networks = [make(name, config.backbone) for name in kind.NETWORKS]
    return kind(*networks, on_nonfinite=config.on_nonfinite, **options)


def per_variable_agreement_logger(gal, path):
    """A callback writing, per epoch, each twin variable's mean share of open
    gates over the epoch's steps: one CSV row per epoch, one column per variable of
    θA (by path). With one gate per variable this is the share of steps whose gate
    was open; at `channel` or `element` granularity, the mean share of the
    variable's scalar parameters whose gate was open. This is the per-layer view of
    the agreement ratio (Figure 1, §4.3.3)."""
    import keras

    names = [v.path for v in gal.twin_a.trainable_variables]

    def write(epoch, logs):
        values = gal.variable_open_fraction.result().numpy()
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write(",".join(["epoch", *names]) + "\n")
            f.write(",".join([str(epoch), *(f"{x:.4f}" for x in values)]) + "\n")

    return keras.callbacks.LambdaCallback(on_epoch_end=write)


def reported_network(config):
    """The network whose accuracy is the run's result: θC for GAL (Tables 1–3),
    θA for cross entropy (warm-up for every epoch, no trained θC), and the twins' joint
    prediction for twin-level ablations without θC (Table 4, Figure 4); a peer
    method's `REPORTED` network (net 1 of two, CE's one)."""
    if config.method != "gal":
        return "net" if config.method == "ce" else "net1"
    if _trains(config, "student"):
        return "student"
    return "joint" if _trains(config, "twin_b") else "twin_a"


def training_labels(data, config):
    """`(noisy, clean)` training labels for `config.noise_type`.

    A real-noise type (`aggre`, `worse`, ..., `noisy`) selects one of the
    dataset's human label sets. A synthetic type is applied, deterministically
    under `--noise_seed`, to the source's annotated labels; those become the
    clean reference unless the source knows better (`y_train_clean`).
    """
    from galkeras.datasets import DatasetError

    if config.noise_type in REAL_NOISE_TYPES:
        sets = data.noisy_label_sets or {}
        if config.noise_type not in sets:
            raise DatasetError(
                f"--noise_type={config.noise_type} is a real-noise label set, but "
                f"{data.name} has {sorted(sets) or 'none'}; use one of those, or a "
                f"synthetic type {noise.NOISE_TYPES}."
            )
        return sets[config.noise_type], data.y_train_clean
    noisy = noise.apply_label_noise(
        data.y_train,
        config.noise_type,
        config.noise_rate,
        data.num_classes,
        seed=config.noise_seed,
        dataset=data.name,
    )
    clean = data.y_train_clean
    if clean is None and config.noise_type != "none":
        clean = data.y_train  # the labels before synthetic noise
    return noisy, clean


def _augment_kind(config, data):
    return data.augmentation if config.augment == "auto" else config.augment


# --------------------------------------------------------------------- flags
FLAGS = flags.FLAGS


def define_flags(flag_values=None):
    """Defines the CLI flags on `flag_values` (default: absl's global FLAGS)."""
    flag_values = FLAGS if flag_values is None else flag_values
    define = _Definer(flag_values)
    d = _DEFAULTS
    define.string(
        "method",
        d["method"],
        f"One of {METHODS}: GAL, or a peer in the same harness (docs/methods.md).",
    )
    define.string("dataset", d["dataset"], "Dataset: `digits` or `npz:PATH`.")
    define.string("data_dir", d["data_dir"], "Where datasets are stored.")
    define.string("noise_type", d["noise_type"], f"One of {NOISE_TYPES}.")
    define.float("noise_rate", d["noise_rate"], "Synthetic noise rate in [0, 1).")
    define.integer("noise_seed", d["noise_seed"], "Seed of the noisy labels.")
    define.integer("seed", d["seed"], "Seed of weights, batches and gates.")
    define.string("backbone", d["backbone"], f"Twins' backbone: {BACKBONES}.")
    define.string(
        "student_backbone",
        d["student_backbone"],
        "θC's backbone (default: --backbone).",
    )
    define.integer(
        "backbone_width",
        d["backbone_width"],
        "Base width of small_cnn and the ResNets (0: the backbone's default).",
    )
    define.string(
        "pretrained_weights",
        d["pretrained_weights"],
        "resnet50: 'imagenet' (downloads) or a weights file; empty: random init.",
    )
    define.integer(
        "hidden_units", d["hidden_units"], "small_cnn: hidden dense units (0: none)."
    )
    define.list("image_size", [], "folder: H,W to resize to (default: first).")
    define.float(
        "validation_split", d["validation_split"], "folder: test share without test/."
    )
    define.float(
        "noisy_validation_split",
        d["noisy_validation_split"],
        "Share in [0, 1) of the noisy training set held out (stratified by the "
        "noisy label, never trained on) and evaluated every epoch on its noisy "
        "labels; summary.json's `selected` is the test accuracy at its best "
        "epoch, and --calibrate fits its temperature on it.",
    )
    define.string("labels_csv", d["labels_csv"], "folder: CSV of path,label.")
    define.bool(
        "skip_corrupt_images", d["skip_corrupt_images"], "Skip undecodable images."
    )
    define.integer("epochs", d["epochs"], "Total epochs E.")
    define.integer("warmup_epochs", d["warmup_epochs"], "Warm-up epochs W.")
    define.integer("batch_size", d["batch_size"], "Global batch size per twin.")
    define.float("lr", d["lr"], "Initial learning rate.")
    define.list(
        "lr_decay_epochs",
        [str(e) for e in d["lr_decay_epochs"]],
        "Epochs at which the learning rate is multiplied by --lr_decay_factor.",
    )
    define.float("lr_decay_factor", d["lr_decay_factor"], "Decay factor.")
    define.float("momentum", d["momentum"], "SGD momentum.")
    define.float("weight_decay", d["weight_decay"], "Weight decay.")
    define.string(
        "weight_decay_mode", d["weight_decay_mode"], f"One of {WEIGHT_DECAY_MODES}."
    )
    define.float("tau", d["tau"], "Agreement threshold τ in [-1, 1].")
    define.float("epsilon", d["epsilon"], "Pseudo-label threshold ε in [0, 1).")
    define.string("update_rule", d["update_rule"], f"One of {UPDATE_RULES}.")
    define.float(
        "random_update_prob", d["random_update_prob"], "p of --update_rule=random."
    )
    define.string("sampling", d["sampling"], f"One of {SAMPLING_MODES}.")
    define.string("masked_update", d["masked_update"], f"One of {MASKED_UPDATES}.")
    define.string(
        "agreement_granularity",
        d["agreement_granularity"],
        f"One of {GRANULARITIES}: one agreement coefficient per trainable variable, "
        "per output channel, or per scalar (sign agreement).",
    )
    define.string(
        "augment",
        d["augment"],
        f"One of {AUGMENTATIONS}; auto = the dataset's default.",
    )
    define.bool("train_student", d["train_student"], "Train θC.")
    define.string(
        "student_start",
        d["student_start"],
        f"One of {STUDENT_STARTS}: θC trains from the first epoch (on θA's "
        "table during the warm-up) or from the twins' split.",
    )
    define.string("model_dir", d["model_dir"], "Run directory (default: runs/…).")
    define.string(
        "export_dir", d["export_dir"], "TF Serving base path (default: saved_models/…)."
    )
    define.integer("verbose", d["verbose"], "Keras fit verbosity (0, 1, 2).")
    define.integer(
        "log_every_steps",
        d["log_every_steps"],
        "Per-step values to TensorBoard and steps.csv every this many steps.",
    )
    define.integer(
        "steps_per_execution",
        d["steps_per_execution"],
        "Train steps per call from Python (Keras' steps_per_execution): the same "
        "run, with fewer host-device round trips. Must divide the steps of an "
        "epoch, --checkpoint_every_steps and (GAL) --log_every_steps.",
    )
    define.bool(
        "train_fit",
        d["train_fit"],
        "Every epoch, log each network's accuracy on the un-augmented training set "
        "against its noisy labels (train_noisy_<net>_accuracy) and clean labels "
        "(train_clean_<net>_accuracy): one more inference pass per epoch.",
    )
    define.string(
        "strategy",
        d["strategy"],
        f"One of {STRATEGIES}: auto = MirroredStrategy over >1 GPUs; multi_worker "
        "reads TF_CONFIG. --batch_size is the global batch.",
    )
    define.bool(
        "sync_batchnorm",
        d["sync_batchnorm"],
        "Average BatchNorm batch statistics over replicas (default: per replica).",
    )
    define.string(
        "mixed_precision",
        d["mixed_precision"],
        f"One of {MIXED_PRECISION}; agreement math stays float32; float16 scales "
        "the loss and skips steps with non-finite gradients.",
    )
    define.string(
        "jit_compile",
        d["jit_compile"],
        f"One of {JIT_COMPILE}: XLA for each network's forward and backward pass "
        "under every strategy, and for the whole step without one. auto: on a "
        "GPU, not on a CPU (measured slower there).",
    )
    define.bool(
        "deterministic",
        d["deterministic"],
        "Deterministic ops (tf.config.experimental.enable_op_determinism) on top "
        "of the seeds: the same flags give bit-identical weights on CPU.",
    )
    define.integer(
        "checkpoint_every_steps",
        d["checkpoint_every_steps"],
        "Also checkpoint every this many steps (0: at the end of every epoch only). "
        "Re-running the same command resumes from the latest checkpoint.",
    )
    define.string(
        "on_nonfinite",
        d["on_nonfinite"],
        f"One of {ON_NONFINITE}: a step with a non-finite loss or gradient stops "
        "the run (exit 3), or is skipped for all three networks and counted.",
    )
    define.bool(
        "new_run",
        d["new_run"],
        "If --model_dir already holds a run, start a new one in a new directory "
        "(<model_dir>-<time>) instead of resuming or reporting it.",
    )
    define.float(
        "forget_rate",
        d["forget_rate"],
        "coteaching, coteaching_plus, jocor: the forget rate τ_f in [0, 1) "
        "(default: the synthetic noise rate, halved for asym; required for real "
        "noise).",
    )
    define.integer(
        "num_gradual", d["num_gradual"], "Epochs T_k of the forget-rate ramp."
    )
    define.float(
        "forget_exponent", d["forget_exponent"], "Exponent c of the ramp's end τ_f^c."
    )
    define.float("co_lambda", d["co_lambda"], "jocor: the co-regularisation λ.")
    define.integer(
        "init_epoch",
        d["init_epoch"],
        "coteaching_plus: the first epoch of disagreement (official: 20 for "
        "CIFAR-10, 5 for CIFAR-100).",
    )
    define.bool(
        "divide_twice",
        d["divide_twice"],
        "coteaching, coteaching_plus: divide the loss by the number kept twice, "
        "as the official code does.",
    )
    define.bool(
        "softmax_twice",
        d["softmax_twice"],
        "coteaching_plus: cross entropy of the probabilities after init_epoch, as "
        "the official code does.",
    )
    define.string(
        "label_issue_probabilities",
        d["label_issue_probabilities"],
        "Whose training-set probabilities score label_issues.csv: a network of "
        f"the method ({', '.join(LABEL_ISSUE_NETWORKS)}) or auto (GAL: θC; the "
        "two-network peers: their joint prediction; ce: net).",
    )
    define.string(
        "label_quality_score",
        d["label_quality_score"],
        f"One of {LABEL_QUALITY_SCORES}: cleanlab's label quality score of each "
        "given label (low: probably wrong).",
    )
    define.string(
        "label_issue_filter",
        d["label_issue_filter"],
        f"One of {LABEL_ISSUE_FILTERS}: cleanlab's find_label_issues filter that "
        "sets is_issue.",
    )
    define.string(
        "write_clean_labels",
        d["write_clean_labels"],
        f"One of {CLEAN_LABEL_MODES} (default: none): also write <model_dir>/"
        "labels.csv for folder: datasets, the issues dropped or relabelled, to "
        "train again with --labels_csv.",
    )
    define.string(
        "calibrate",
        d["calibrate"],
        f"One of {CALIBRATIONS}: the exported network's probabilities as they "
        "are, or divided by one temperature fitted so that, passed through the "
        "label noise (known, or estimated by confident learning), they best "
        "explain the noisy held-out labels (the training set's without "
        "--noisy_validation_split).",
    )
    define.bool(
        "dry_run",
        d["dry_run"],
        "Check the flags, build every network and pipeline and train one step of "
        "each phase on stand-in data of the dataset's shape; writes no run.",
    )

    def ints(values):
        try:
            [int(v) for v in values]
        except ValueError:
            return False
        return True

    flags.register_validator(
        "lr_decay_epochs",
        ints,
        message="--lr_decay_epochs must be a list of integers.",
        flag_values=flag_values,
    )


class _Definer:
    """`define.string(...)` is `flags.DEFINE_string(..., flag_values=...)`."""

    def __init__(self, flag_values):
        self.flag_values = flag_values

    def __getattr__(self, kind):
        define = getattr(flags, f"DEFINE_{kind}")

        def call(*args, **kwargs):
            return define(*args, flag_values=self.flag_values, **kwargs)

        return call


def config_from_flagfile(path, **overrides):
    """The `TrainConfig` a flag file describes (plus `overrides`), parsed with
    absl exactly as `python -m galkeras.train --flagfile=PATH` would, without
    touching the global flags.

    Raises:
        ValueError: naming the file, for a missing file, an unknown flag or a value
            absl refuses.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Flag file {path} does not exist.")
    try:
        config = config_from_args([f"--flagfile={path}"])
    except flags.Error as error:
        raise ValueError(f"Flag file {path}: {error}") from error
    return dataclasses.replace(config, **overrides)


def config_from_args(args):
    """The `TrainConfig` of `python -m galkeras.train ARGS`, parsed with absl
    without touching the global flags (a relative `--flagfile` is read from the
    working directory). Raises absl's `flags.Error` for a flag it refuses."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["galkeras.train", *args])
    return config_from_flags(flag_values)


def config_from_flags(flag_values=None):
    flag_values = FLAGS if flag_values is None else flag_values
    values = {
        f.name: flag_values[f.name].value for f in dataclasses.fields(TrainConfig)
    }
    values["lr_decay_epochs"] = tuple(int(e) for e in values["lr_decay_epochs"])
    values["image_size"] = tuple(values["image_size"])
    return TrainConfig(**values)


def parse_command_line(argv, flag_values=None):
    """Parses `argv` into `flag_values` (default: absl's FLAGS) for `app.run`.

    Anything absl refuses (an unknown flag, a value of the wrong type, a flag
    file that cannot be read or holds a typo) and any positional argument exit
    with status 2 and one line naming the problem, like every other bad flag.
    """
    flag_values = FLAGS if flag_values is None else flag_values
    try:
        rest = flag_values(argv)
    except flags.Error as error:
        _fail(f"{_flag_error_message(error, argv)} See --help for the flags.")
    if len(rest) > 1:
        _fail(
            f"unexpected argument(s) {' '.join(rest[1:])!r}: galkeras.train takes "
            "only --flags (write --flag=value). See --help for the flags."
        )
    return rest


def _flag_error_message(error, argv):
    """absl's message, with the flag file named when the fault is inside one."""
    message = str(error).replace("ERROR:: ", "").strip()
    flag_name = getattr(error, "flagname", None)
    if isinstance(error, flags.UnrecognizedFlagError) and flag_name:
        for arg in argv:
            path = arg.partition("=")[2] if arg.startswith("--flagfile=") else ""
            try:
                with open(path) as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            if f"--{flag_name}" in text:
                message = message.replace(
                    f"'{flag_name}'", f"'{flag_name}' (in the flag file {path})", 1
                )
    return message.rstrip(".") + "."


def main(argv):
    logging.set_verbosity(logging.WARNING)
    config = config_from_flags()
    problems = config_problems(config)
    if problems:
        _fail("\n".join(problems))
    from galkeras import checkpointing
    from galkeras.model import NonFiniteError

    try:
        summary = run(config)
    except ConfigError as error:
        _fail(str(error))
    except checkpointing.Preempted as preempted:
        print(f"galkeras.train: {_with_resume(config, preempted)}", file=sys.stderr)
        sys.exit(checkpointing.PREEMPTED_EXIT_CODE)
    except (NonFiniteError, checkpointing.CheckpointWriteError) as error:
        print(f"galkeras.train: error: {_with_resume(config, error)}", file=sys.stderr)
        sys.exit(EXIT_TRAINING_FAULT)
    except KeyboardInterrupt as interrupt:
        if not isinstance(interrupt, checkpointing.Interrupted):  # not in training
            interrupt = "interrupted (Ctrl-C); re-run the same command to resume."
        print(f"galkeras.train: {_with_resume(config, interrupt)}", file=sys.stderr)
        sys.exit(checkpointing.INTERRUPTED_EXIT_CODE)
    if summary.get("already_finished"):
        print(f"galkeras.train: {summary['already_finished']}")
    print(format_summary(summary))


def _with_resume(config, fault):
    """`fault`'s message, telling how to resume when the same command would not
    (it would start yet another new run)."""
    message = str(fault)
    model_dir = getattr(fault, "model_dir", None)
    flag = model_dir and run_directory.resume_command(config, model_dir)
    if not flag:
        return message
    instead = f"re-run with {flag}" + (
        " and without --new_run" if config.new_run else ""
    )

    def capitalised(match):
        return instead[0].upper() + instead[1:] if match[0][0] == "R" else instead

    message, replaced = re.subn(r"[Rr]e-run the same command", capitalised, message)
    if not replaced:
        message += f" The run is in {model_dir}: to resume it, {instead}."
    return message


def _fail(message):
    print(f"galkeras.train: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_main():
    define_flags()
    app.run(main, flags_parser=parse_command_line)


if __name__ == "__main__":
    run_main()
