"""Label issues: which training labels are probably wrong, ranked, and a cleaned
label file.

Every training sample is scored by the *label quality* of its given label under
a run's predicted class probabilities: the self-confidence `p(ỹ_i | x_i)` (low:
probably mislabelled), or the normalised margin `p(ỹ_i | x_i) − max_{k≠ỹ_i}
p(k | x_i)` mapped to [0, 1]. These are cleanlab's `get_label_quality_scores`,
called, not rewritten, so the numbers compare with cleanlab's own. Which
samples are issues is cleanlab's `find_label_issues` (confident learning) on the
same probabilities.

A network that memorised the noisy labels predicts them, so every label looks
right under its training-set probabilities; GAL is built to keep its networks
from memorising. cleanlab's own recipe uses out-of-fold probabilities instead
(`benchmarks/label_issues.py` compares the two).

`python -m galkeras.label_issues --model_dir=RUN` recomputes a finished run's
`label_issues.csv` with other options, from its checkpoint, without training.
"""

import contextlib
import csv
import dataclasses
import os
import sys
import weakref

import numpy as np

# cleanlab's label quality scores, and its `find_label_issues` filters.
SCORES = ("self_confidence", "normalized_margin")
FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
# `--write_clean_labels`: leave the issues out, or give them the suggested label.
CLEAN_MODES = ("drop", "relabel")
FILE_NAME = "label_issues.csv"
CLEAN_LABELS_FILE = "labels.csv"


_PREDICT_FUNCTIONS = weakref.WeakKeyDictionary()


def network_probabilities(method, network, images, batch_size=256):
    """float32 `[N, K]` class probabilities of `method.classifier(network)` on
    `images` (uint8 `[N, H, W, C]` or `ImageFiles`), un-augmented, in inference
    mode, spread over the method's strategy."""
    # From the logits pass, which the calibration pass shares (one trace).
    logits = network_logits(method, [network], images, batch_size)[network]
    if logits is None:
        return None
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def network_logits(method, networks, images, batch_size=256):
    """`{name: float32 [N, K] logits}` of `method.classifier(name)` for each of
    `networks` on `images`, in one pass, as `network_probabilities` runs them
    (`joint`: `log p_joint`)."""
    networks = list(networks)
    outputs = _network_outputs(method, networks, images, batch_size)
    return dict(zip(networks, outputs))


def _network_outputs(method, networks, images, batch_size):
    import tensorflow as tf

    from galkeras import sampling
    from galkeras.teacher import predict_over

    # One function per method and networks, kept with the method: the
    # label-issue and calibration passes of a run share their traces.
    functions = _PREDICT_FUNCTIONS.setdefault(method, {})
    key = tuple(networks)
    if key not in functions:
        models = [method.classifier(name) for name in networks]

        # A shape-relaxed trace, not an input signature: under a multi-worker
        # strategy an input signature refuses the replicas' values.
        @tf.function(reduce_retracing=True, autograph=False)
        def predict(batch):
            outputs = []
            for model in models:
                outputs.append(
                    tf.cast(model(batch["image"], training=False), tf.float32)
                )
            # Batch-major: the replicas' results are joined along the first axis.
            return batch["id"], tf.stack(outputs, axis=1)

        functions[key] = predict
    predict = functions[key]

    stacked = None
    dataset = sampling.inference_dataset(images, batch_size)
    for ids, batch in predict_over(method.distribute_strategy, predict, dataset):
        if stacked is None:
            stacked = np.zeros((len(images), *batch.shape[1:]), np.float32)
        stacked[ids] = batch
    if stacked is None:
        return [None] * len(networks)
    return [stacked[:, i] for i in range(len(networks))]


def label_quality(probabilities, labels, score="self_confidence"):
    """Each sample's label quality in [0, 1] (low: probably mislabelled).

    Args:
        probabilities: float `[N, K]`, each row a distribution over classes.
        labels: int `[N]`, the given labels.
        score: `"self_confidence"` (`p(label)`) or `"normalized_margin"`.
    """
    from cleanlab.rank import get_label_quality_scores

    return get_label_quality_scores(
        np.asarray(labels), _distributions(probabilities), method=score
    )


def find_issues(probabilities, labels, filter_by="prune_by_noise_rate"):
    """Bool `[N]`: cleanlab's `find_label_issues` (confident learning) on
    `probabilities`, with its filter `filter_by`."""
    from cleanlab.filter import find_label_issues

    return find_label_issues(
        np.asarray(labels),
        _distributions(probabilities),
        filter_by=filter_by,
        # In process: a fork of a process running TensorFlow can deadlock.
        n_jobs=1,
    )


def _distributions(probabilities):
    """float64 rows renormalised to sum to 1 (float32 softmax rows are off by
    ~1e-7, which cleanlab's input checks can refuse)."""
    p = np.asarray(probabilities, np.float64)
    return p / p.sum(axis=1, keepdims=True)


@dataclasses.dataclass
class LabelIssues:
    """The label issues of a training set, one entry per sample (by index).

    Attributes:
        given: int `[N]`, the labels trained on.
        suggested: int `[N]`, the most probable class.
        quality: float `[N]`, the label quality score.
        is_issue: bool `[N]`, flagged by confident learning.
        heldout: bool `[N]`, held out of training (`--noisy_validation_split`):
            its probabilities are out-of-sample.
        paths: `[N]` file paths relative to the dataset's root, or None.
    """

    given: np.ndarray
    suggested: np.ndarray
    quality: np.ndarray
    is_issue: np.ndarray
    heldout: np.ndarray
    paths: list | None = None

    @property
    def ranking(self):
        """Sample indices, most suspicious first: ascending quality, ties by
        index."""
        return np.lexsort((np.arange(len(self.quality)), self.quality))


def find_label_issues(
    probabilities,
    labels,
    score="self_confidence",
    filter_by="prune_by_noise_rate",
    heldout_ids=(),
    paths=None,
):
    """`LabelIssues` of `labels` under `probabilities` (`[N, K]`)."""
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels, np.int64)
    heldout = np.zeros(len(labels), bool)
    heldout[np.asarray(heldout_ids, np.int64)] = True
    return LabelIssues(
        given=labels,
        suggested=probabilities.argmax(axis=1),
        quality=label_quality(probabilities, labels, score),
        is_issue=find_issues(probabilities, labels, filter_by),
        heldout=heldout,
        paths=None if paths is None else list(paths),
    )


def issue_rows(issues, class_names):
    """The rows of `label_issues.csv`, most suspicious first: `index`, `path`
    (for file sources), `given_label` and `suggested_label` as class names,
    `label_quality`, `is_issue` and `heldout` (0/1)."""
    rows = []
    for i in issues.ranking:
        row = {"index": int(i)}
        if issues.paths is not None:
            row["path"] = issues.paths[i]
        row.update(
            given_label=class_names[issues.given[i]],
            suggested_label=class_names[issues.suggested[i]],
            label_quality=f"{issues.quality[i]:.6g}",
            is_issue=int(issues.is_issue[i]),
            heldout=int(issues.heldout[i]),
        )
        rows.append(row)
    return rows


def clean_label_rows(issues, mode, class_names, dropped_before=()):
    """`(path, label)` rows of a `folder:PATH --labels_csv` file for the whole
    training set: the issues left out (`drop`: an empty label, which that
    source reads as "not a training image") or given the suggested label
    (`relabel`); every other sample keeps its given label. `dropped_before`
    (paths an earlier cleaning dropped, not in this training set) stay dropped."""
    if mode not in CLEAN_MODES:
        raise ValueError(f"mode must be one of {CLEAN_MODES}; got {mode!r}.")
    if issues.paths is None:
        raise ValueError("Clean labels need the samples' file paths.")
    rows = []
    for i, path in enumerate(issues.paths):
        label = class_names[issues.given[i]]
        if issues.is_issue[i]:
            label = "" if mode == "drop" else class_names[issues.suggested[i]]
        rows.append((path, label))
    rows += [(path, "") for path in dropped_before]
    return rows


def dropped_paths(labels_csv):
    """The paths that a `--labels_csv` file leaves out of training (its rows
    with an empty label), as written."""
    with open(labels_csv, encoding="utf-8-sig", newline="") as f:
        return [
            row[0].strip()
            for row in csv.reader(f)
            if len(row) == 2 and not row[1].strip() and row[0] != "path"
        ]


def write_csv(path, header, rows, overwrite=False):
    """Writes `rows` (dicts or sequences) under `header` to `path`, whole or not
    at all (a temporary file renamed into place). Refuses an existing `path`
    unless `overwrite`."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass --overwrite to replace it, or choose "
            "another --out."
        )
    partial = path + ".partial"
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row[k] for k in header] if isinstance(row, dict) else row)
    os.replace(partial, path)
    return path


def write_label_issues(path, issues, class_names, overwrite=False):
    """Writes `label_issues.csv` (`issue_rows`); returns the path."""
    rows = issue_rows(issues, class_names)
    header = list(rows[0]) if rows else ["index"]
    return write_csv(path, header, rows, overwrite)


def write_clean_labels_csv(
    path, issues, mode, class_names, dropped_before=(), overwrite=False
):
    """Writes `labels.csv` (`clean_label_rows`, `path,label`); returns the path."""
    rows = clean_label_rows(issues, mode, class_names, dropped_before)
    return write_csv(path, ["path", "label"], rows, overwrite)


def summary_line(issues):
    """One line for the run's printout."""
    count = int(issues.is_issue.sum())
    return (
        f"label issues: {count} of {len(issues.is_issue)} training labels "
        f"({100 * count / max(len(issues.is_issue), 1):.1f}%) flagged"
    )


class RunProblem(ValueError):
    """A `--model_dir` whose label issues cannot be recomputed; the message
    names what is missing or does not match, and the fix."""


def finished_run_problems(model_dir):
    """Why `model_dir` holds no finished run to rebuild (empty when it does)."""
    if not os.path.isdir(model_dir):
        return [f"--model_dir={model_dir}: no such directory."]
    needed = {
        "config.json": "it is not a galkeras.train run directory",
        "labels.npz": "the record of the labels it trained on is missing",
        "summary.json": "the run has not finished (resume it with galkeras.train "
        "first)",
        os.path.join("checkpoints", "checkpoint"): "it has no checkpoint",
    }
    return [
        f"--model_dir={model_dir} has no {name}: {why}."
        for name, why in needed.items()
        if not os.path.isfile(os.path.join(model_dir, name))
    ]


def from_run(
    model_dir,
    probabilities="auto",
    score="self_confidence",
    filter_by="prune_by_noise_rate",
    write_clean_labels="",
    out=None,
    clean_labels_out=None,
    overwrite=False,
):
    """Recomputes a finished run's label issues with other options, from its
    last checkpoint, without training.

    Args:
        model_dir: the run directory of a finished `galkeras.train` run.
        probabilities: the network whose training-set probabilities score the
            labels (`--label_issue_probabilities`: `auto`, `joint`, ...).
        score: one of `SCORES`.
        filter_by: one of `FILTERS`.
        write_clean_labels: `""`, `"drop"` or `"relabel"` (folder: datasets).
        out: where `label_issues.csv` goes (default: in `model_dir`).
        clean_labels_out: where `labels.csv` goes (default: in `model_dir`).
        overwrite: replace existing output files.

    Returns:
        `(LabelIssues, [written paths])`.

    Raises:
        RunProblem: no finished run there, bad options for it, or a checkpoint
            or data that no longer match its `labels.npz`.
        FileExistsError: an output exists and `overwrite` is False.
    """
    from galkeras import train

    # Everything that can be refused is refused before TensorFlow loads.
    problems = finished_run_problems(model_dir)
    if problems:
        raise RunProblem("\n".join(problems))
    config = dataclasses.replace(
        train.config_of_run(model_dir),
        model_dir=model_dir,
        label_issue_probabilities=probabilities,
        label_quality_score=score,
        label_issue_filter=filter_by,
        write_clean_labels=write_clean_labels,
    )
    problems = train.label_issue_problems(config)
    if problems:
        raise RunProblem("\n".join(problems))
    out = out or os.path.join(model_dir, FILE_NAME)
    clean_labels_out = clean_labels_out or os.path.join(model_dir, CLEAN_LABELS_FILE)
    for path in [out, *([clean_labels_out] if write_clean_labels else [])]:
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass --overwrite to replace it, or "
                "choose another output path."
            )

    with restored_run(config) as (method, loaded):
        probs = network_probabilities(
            method,
            train.label_issue_network(config),
            loaded.data.x_train,
            batch_size=max(config.batch_size, 256),
        )
    issues = find_label_issues(
        probs,
        loaded.noisy,
        score=score,
        filter_by=filter_by,
        heldout_ids=(
            () if len(loaded.train_ids) == len(loaded.noisy) else loaded.heldout_ids
        ),
        paths=loaded.data.train_paths,
    )
    class_names = loaded.data.class_names
    written = [write_label_issues(out, issues, class_names, overwrite=True)]
    if write_clean_labels:
        before = dropped_paths(config.labels_csv) if config.labels_csv else ()
        written.append(
            write_clean_labels_csv(
                clean_labels_out,
                issues,
                write_clean_labels,
                class_names,
                dropped_before=before,
                overwrite=True,
            )
        )
    return issues, written


@contextlib.contextmanager
def restored_run(config):
    """The method of the finished run in `config.model_dir` and its
    `train.TrainingData`, rebuilt as the run built them and restored from its
    last checkpoint (read-only), under the run's mixed-precision policy:
    `with restored_run(config) as (method, loaded): ...`.

    Raises:
        RunProblem: data that no longer give the labels the run recorded in
            `labels.npz`, or a checkpoint that is unreadable or does not match.
    """
    import keras

    from galkeras import checkpointing, train

    model_dir = config.model_dir
    loaded = train.load_training_data(config)
    record = os.path.join(model_dir, "labels.npz")
    with np.load(record) as saved:
        recorded = saved["noisy_labels"]
    if recorded.shape != loaded.noisy.shape or not np.array_equal(
        recorded, loaded.noisy
    ):
        raise RunProblem(
            f"The data of --dataset={config.dataset} no longer give the labels "
            f"{record} recorded ({len(recorded)} then, {len(loaded.noisy)} now): "
            "put the run's data back (and its --data_dir) to rebuild the run."
        )
    policy = keras.mixed_precision.global_policy()
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{config.mixed_precision}")
    try:
        prepared = train.Prepared(
            loaded.data,
            loaded.noisy,
            loaded.clean,
            loaded.train_ids,
            loaded.heldout_ids,
            loaded.noise_rate_actual,
            model_dir,
            None,
        )
        method, training_set = train.build_run(config, prepared)
        directory = os.path.join(model_dir, checkpointing.CHECKPOINT_DIR)
        run_checkpoint = checkpointing.RunCheckpoint(
            method, directory, training_set.labels
        )
        try:
            # Read-only: a damaged checkpoint is skipped but not set aside.
            step = run_checkpoint.restore(directory)
        except checkpointing.CheckpointMismatch as error:
            raise RunProblem(str(error)) from error
        if not step:
            raise RunProblem(f"{directory} holds no readable checkpoint.")
        yield method, loaded
    finally:
        keras.mixed_precision.set_global_policy(policy)


def define_flags(flag_values):
    """The CLI's flags, in `flag_values`."""
    from absl import flags

    flags.DEFINE_string(
        "model_dir", None, "A finished galkeras.train run.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "probabilities",
        "auto",
        "Whose training-set probabilities: auto, or a network of the run's method "
        "(GAL: joint, student, twin_a, twin_b; ce: net; peers: joint, net1, net2).",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "score",
        "self_confidence",
        SCORES,
        "cleanlab's label quality score.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "filter_by",
        "prune_by_noise_rate",
        FILTERS,
        "cleanlab's find_label_issues filter (is_issue).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "write_clean_labels",
        "",
        "drop or relabel: also write labels.csv (folder: datasets).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "out",
        None,
        "label_issues.csv's path (default: in --model_dir).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "clean_labels_out",
        None,
        "labels.csv's path (default: in --model_dir).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace existing output files.", flag_values=flag_values
    )


def _fail(message):
    print(f"galkeras.label_issues: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    """`python -m galkeras.label_issues --model_dir=RUN [options]`."""
    from absl import flags

    flag_values = flags.FlagValues()
    define_flags(flag_values)
    argv = sys.argv if argv is None else argv
    try:
        rest = flag_values(argv)
    except flags.Error as error:
        _fail(f"{error}. See --help for the flags.")
    if len(rest) > 1:
        _fail(f"unexpected argument(s) {' '.join(rest[1:])!r}; see --help.")
    if not flag_values.model_dir:
        _fail("give --model_dir=RUN, the directory of a finished run.")
    try:
        issues, written = from_run(
            flag_values.model_dir,
            probabilities=flag_values.probabilities,
            score=flag_values.score,
            filter_by=flag_values.filter_by,
            write_clean_labels=flag_values.write_clean_labels,
            out=flag_values.out,
            clean_labels_out=flag_values.clean_labels_out,
            overwrite=flag_values.overwrite,
        )
    except (RunProblem, FileExistsError, ValueError) as error:
        _fail(str(error))
    print(summary_line(issues))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
