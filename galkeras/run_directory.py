"""Run-directory policy: what may be written where, and how a run is resumed.

- a `--model_dir` holding files that are not a galkeras run (no `config.json`)
  is never written to;
- a finished run (`summary.json`) is reported, not retrained;
- a new run never shares a directory;
- a run's record (`config.json`, then `labels.npz`) is written once everything
  that can fail on a flag is built, and checked against the data on resume.
"""

import dataclasses
import json
import os

# The run lock's file name (`galkeras.checkpointing.LOCK_FILE`; a plain copy, so
# that flags are checked before TensorFlow loads).
LOCK_FILE = ".galkeras.lock"


class RunRecordMismatch(ValueError):
    """The data a run's `labels.npz` recorded differ from the data now."""


def foreign_directory_problems(directory):
    """A refusal when `directory` holds files that are not a galkeras run's:
    galkeras never writes among them, with or without --new_run."""
    if not directory or not os.path.isdir(directory):
        return []
    # Only a lock: another process has just started this run (the lock says so),
    # or a run that stopped before it wrote its record.
    if not set(os.listdir(directory)) - {LOCK_FILE, "config.json.partial"}:
        return []
    if os.path.isfile(os.path.join(directory, "config.json")):
        return []
    return [
        f"--model_dir={directory} holds files but no galkeras run "
        "(config.json); galkeras never writes among them. Choose another "
        "--model_dir (a new or empty directory)."
    ]


class RunFinished(Exception):
    """`model_dir` holds a run that finished; `summary` is its summary."""

    def __init__(self, model_dir, summary):
        self.model_dir, self.summary = model_dir, summary
        super().__init__(
            f"The run in {model_dir} already finished (summary.json); nothing to "
            "do. Add --new_run to train a new run in a new directory."
        )


def refuse_finished(model_dir):
    """Raises `RunFinished` if `model_dir` holds a finished run's summary."""
    summary_path = os.path.join(model_dir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            raise RunFinished(model_dir, json.load(f))


def holds_a_run(directory):
    """Whether `directory` holds a galkeras run (its `config.json`)."""
    return os.path.isfile(os.path.join(directory, "config.json"))


def unused_directory(path):
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist yet (two
    runs started within the same second would otherwise share a directory)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def write_run_record(model_dir, config, noisy, clean, heldout_ids):
    """Writes a new run's `config.json` and `labels.npz`, kept for resumes.

    Called when everything that can fail on a flag's value has been built, so a
    run that fails to start leaves no record that would refuse a corrected retry
    as "started with other flags". `config.json` comes first, since it marks
    the directory as a galkeras run (whose files galkeras may then write);
    each file appears whole or not at all, and a missing one is written again.
    """
    import numpy as np

    record = os.path.join(model_dir, "config.json")
    if not os.path.isfile(record):
        with open(record + ".partial", "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
        os.replace(record + ".partial", record)
    labels = os.path.join(model_dir, "labels.npz")
    if os.path.isfile(labels):
        # A run that stopped before its first checkpoint has only this record
        # of the data it started on.
        with np.load(labels) as record:
            before = record["noisy_labels"]
        cause = (
            f"{len(before)} examples when the run started, now {len(noisy)}"
            if before.shape != noisy.shape
            else f"other noisy labels for {int(np.sum(before != noisy))} of them"
            if not np.array_equal(before, noisy)
            else None
        )
        if cause:
            raise RunRecordMismatch(
                f"Cannot resume the run in {model_dir}: the training set changed "
                f"since the run started ({cause}; {labels}). Put the original data "
                "back to resume, or start a new run (--new_run)."
            )
    else:
        with open(labels + ".partial", "wb") as f:
            np.savez(
                f,
                noisy_labels=noisy,
                **({"clean_labels": clean} if clean is not None else {}),
                **({"heldout_ids": heldout_ids} if len(heldout_ids) else {}),
            )
        os.replace(labels + ".partial", labels)


def resume_command(config, model_dir):
    """The flags that resume the run in `model_dir`: None when the command that
    started it does (it names that directory and has no --new_run); otherwise
    `--model_dir=<model_dir>`, since re-running the same command would start
    yet another run."""
    same = config.model_dir and os.path.abspath(config.model_dir) == os.path.abspath(
        model_dir
    )
    if same and not config.new_run:
        return None
    return f"--model_dir={model_dir}"
