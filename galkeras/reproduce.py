"""`python -m galkeras.reproduce --table=N` or `--figure=N`: one paper experiment.

It runs the experiment's flag files (`flags/`) one after another, each as its own
`python -m galkeras.train` process with its own run directory under `--runs_dir`,
skips the runs that have already finished (their `summary.json` exists), then
writes the experiment's table (Markdown, the paper's layout) or figure (PNG) to
`--out` with `galkeras.report`. `--dry_run` instead checks every file: it builds
every network and pipeline and trains one step of each phase on stand-in data.

A flag file may include another (a line `--flagfile=flags/table1/base/x.flags`),
and absl reads such a path from the working directory. So every run and every
dry run works in the parent of the flags directory (the repository root for
`flags/`), and the paths it is given are absolute.

    python -m galkeras.reproduce --table=1 --data_dir=~/tensorflow_datasets
    python -m galkeras.reproduce --figure=4 --dry_run
"""

import contextlib
import dataclasses
import glob
import os
import subprocess
import sys

from absl import app, flags

# Flag files (globs relative to the flags directory) of each experiment. θC does
# not influence the twins, so a GAL run also gives Table 4's "θA + θB + Gradient
# Agreement Updating" row (its joint accuracy) and Figure 4's τ = 0.4 point.
# Tables 1-3 hold one file per method and setting (GAL's is `<setting>.flags`,
# the others `<setting>_<method>.flags`), so a table's glob runs every method;
# the protocol they share is in `tableN/base/`, which the globs do not reach,
# since a base is no run.
_GAL_CIFAR10 = tuple(
    f"table1/cifar10_{s}.flags" for s in ("sym20", "sym50", "sym80", "asym40")
)
EXPERIMENTS = {
    "table1": ("table1/*.flags",),
    "table2": ("table2/*.flags",),
    "table3": ("table3/*.flags",),
    "table4": (
        *_GAL_CIFAR10,
        *(f.replace(".flags", "_ce.flags") for f in _GAL_CIFAR10),
        "table4/*.flags",
    ),
    "table5": (*_GAL_CIFAR10, "table5/*.flags"),
    "tablen": ("cifar_n/*.flags",),
    "figure1": ("figure1/*.flags",),
    "figure4": (*_GAL_CIFAR10, "figure4/*.flags"),
}
TABLES = ("1", "2", "3", "4", "5", "n")
FIGURES = ("1", "4")


class ReproduceError(ValueError):
    """A bad request, found before any run starts."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One flag file at one seed, and where its run lives."""

    flag_file: str
    seed: int
    run_dir: str

    @property
    def finished(self):
        return os.path.exists(os.path.join(self.run_dir, "summary.json"))


def experiment_files(experiment, flags_dir):
    """The flag files of `experiment` (a key of `EXPERIMENTS`), in order."""
    if experiment not in EXPERIMENTS:
        raise ReproduceError(
            f"Unknown experiment {experiment!r}; known: {sorted(EXPERIMENTS)}."
        )
    if not os.path.isdir(flags_dir):
        raise ReproduceError(
            f"--flags_dir={flags_dir} is not a directory; run from the galkeras "
            f"repository root or point --flags_dir at its flags/ directory."
        )
    files = []
    for pattern in EXPERIMENTS[experiment]:
        matches = sorted(glob.glob(os.path.join(flags_dir, pattern)))
        if not matches:
            where = os.path.join(flags_dir, pattern)
            raise ReproduceError(f"{experiment}: no flag file matches {where}.")
        files += [m for m in matches if m not in files]
    return files


def flags_root(flags_dir):
    """The directory that nested `--flagfile=flags/...` lines are relative to:
    the parent of the flags directory (for `flags/`, the repository root)."""
    return os.path.dirname(os.path.abspath(flags_dir))


@contextlib.contextmanager
def working_directory(path):
    """Runs the body in `path`, then returns to the directory it was in."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def plan_runs(files, flags_dir, runs_dir, seeds):
    """A `PlannedRun` per file and seed: `<runs_dir>/<file's path>_s<seed>`."""
    runs = []
    for flag_file in files:
        name = os.path.splitext(os.path.relpath(flag_file, flags_dir))[0]
        for seed in seeds:
            run_dir = os.path.join(runs_dir, f"{name}_s{seed}")
            runs.append(PlannedRun(flag_file, seed, run_dir))
    return runs


def unfinished(runs):
    """Runs whose directory holds files but no `summary.json`: a run that
    stopped part-way. They are never deleted or overwritten."""
    return [
        r
        for r in runs
        if not r.finished and os.path.isdir(r.run_dir) and os.listdir(r.run_dir)
    ]


def train_command(run, data_dir=None):
    """The `python -m galkeras.train` command line of one run. Its paths are
    absolute, since it runs in `flags_root`, not in the caller's directory."""
    run_dir = os.path.abspath(run.run_dir)
    command = [
        sys.executable,
        "-m",
        "galkeras.train",
        f"--flagfile={os.path.abspath(run.flag_file)}",
        f"--seed={run.seed}",
        f"--model_dir={run_dir}",
        f"--export_dir={os.path.join(run_dir, 'export')}",
        "--verbose=2",
    ]
    if data_dir:
        command.append(f"--data_dir={_absolute(data_dir)}")
    return command


def _absolute(path):
    return os.path.abspath(os.path.expanduser(path))


def dry_run_file(flag_file, root=None, **overrides):
    """Dry-runs one flag file in this process (`galkeras.train --dry_run`):
    builds its networks and pipeline and trains one step of each phase on
    stand-in data. Saves the TensorFlow start-up of a process per file.

    Args:
        flag_file: the flag file.
        root: the directory its nested `--flagfile` lines (and any other
            relative path in it) are relative to, as for a run; default: the
            current one, as for `python -m galkeras.train`.
        **overrides: `TrainConfig` fields to set; None values are ignored.

    Raises:
        ReproduceError: naming the file, for bad flags or a failing build or step.
    """
    import keras

    from galkeras import train

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("data_dir"):
        overrides["data_dir"] = _absolute(overrides["data_dir"])
    path = os.path.abspath(flag_file)
    try:
        with working_directory(root or os.getcwd()):
            config = train.config_from_flagfile(path, dry_run=True, **overrides)
            problems = train.config_problems(config)
            if problems:
                raise ValueError("\n".join(problems))
            train.run(dataclasses.replace(config, verbose=0))
    except Exception as error:  # name the file whatever broke
        raise ReproduceError(
            f"{flag_file}: dry run failed: {type(error).__name__}: {error}"
        ) from error
    finally:
        keras.backend.clear_session()


def reproduce(
    experiment,
    *,
    flags_dir="flags",
    runs_dir=os.path.join("runs", "reproduce"),
    out="reports",
    seeds=(0,),
    data_dir=None,
    dry_run=False,
    run=subprocess.run,
    log=print,
):
    """Runs (or dry-runs) an experiment and writes its table or figure.

    Args:
        experiment: a key of `EXPERIMENTS`, e.g. `"table1"`, `"figure4"`.
        flags_dir: the directory of the flag files.
        runs_dir: where each run's directory is made.
        out: where the table or figure is written.
        seeds: the seeds to run each file with.
        data_dir: passed to every run as `--data_dir`.
        dry_run: check every file with `--dry_run` instead; writes no run.
        run: `subprocess.run`-like function, called as `run(command,
            check=False, cwd=flags_root(flags_dir))` (tests pass a recorder).
        log: function printing one line of progress.

    Returns:
        The paths written (empty for a dry run).

    Raises:
        ReproduceError: for a bad request, an unfinished run in the way (both
            before any run starts) or a run that fails (naming its file).
    """
    files = experiment_files(experiment, flags_dir)
    runs = plan_runs(files, flags_dir, runs_dir, seeds)
    root = flags_root(flags_dir)
    if not dry_run:
        stuck = unfinished(runs)
        if stuck:
            listed = "\n".join(f"  {r.run_dir} ({r.flag_file})" for r in stuck)
            raise ReproduceError(
                f"{len(stuck)} run directories hold an unfinished run, which "
                f"galkeras never overwrites:\n{listed}\n"
                f"Move or delete them, or pass another --runs_dir."
            )
    for index, planned in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {planned.flag_file} (seed {planned.seed})"
        if planned.finished and not dry_run:
            log(f"{prefix}: finished earlier, skipped ({planned.run_dir})")
            continue
        if dry_run:
            log(f"{prefix}: dry run")
            dry_run_file(planned.flag_file, root, seed=planned.seed, data_dir=data_dir)
            continue
        log(f"{prefix}: running")
        result = run(train_command(planned, data_dir), check=False, cwd=root)
        if result.returncode != 0:
            raise ReproduceError(
                f"{planned.flag_file} (seed {planned.seed}) failed with exit code "
                f"{result.returncode}; its run directory is {planned.run_dir}."
            )
    if dry_run:
        log(f"dry run passed: {len(runs)} flag file(s) of {experiment}")
        return []
    from galkeras import report

    return report.write_experiment(experiment, [r.run_dir for r in runs], out)


def define_flags():
    flags.DEFINE_enum("table", None, TABLES, "Paper table to reproduce (n: CIFAR-N).")
    flags.DEFINE_enum("figure", None, FIGURES, "Paper figure to reproduce.")
    flags.DEFINE_string("flags_dir", "flags", "Directory of the flag files.")
    flags.DEFINE_string(
        "runs_dir", os.path.join("runs", "reproduce"), "Where runs are made."
    )
    flags.DEFINE_string("out", "reports", "Where the table or figure is written.")
    flags.DEFINE_list("seeds", ["0"], "Seeds to run each file with (Table 5: 0-4).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory for every run.")
    flags.DEFINE_bool("dry_run", False, "Dry-run every flag file; write no run.")


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if (FLAGS.table is None) == (FLAGS.figure is None):
        _fail("give exactly one of --table and --figure.")
    try:
        seeds = tuple(int(s) for s in FLAGS.seeds)
    except ValueError:
        _fail(f"--seeds={','.join(FLAGS.seeds)} must be integers.")
    experiment = f"table{FLAGS.table}" if FLAGS.table else f"figure{FLAGS.figure}"
    try:
        written = reproduce(
            experiment,
            flags_dir=FLAGS.flags_dir,
            runs_dir=FLAGS.runs_dir,
            out=FLAGS.out,
            seeds=seeds,
            data_dir=FLAGS.data_dir,
            dry_run=FLAGS.dry_run,
        )
    except ReproduceError as error:
        _fail(str(error))
    for path in written:
        print(f"wrote {path}")


def _fail(message):
    print(f"galkeras.reproduce: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_main():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()
