"""Never lose a run: checkpoints of a whole GAL run, resume, preemption, the lock.

A checkpoint holds everything a run needs to continue as if never stopped:

- θA, θB and θC with their non-trainable state (BatchNorm statistics);
- the three optimizers' slots and iteration counters (the learning-rate schedule
  and the `random` rule's draws follow the iteration counter);
- GAL's own state: the warm-up switch (`twins_split`), loss scales, the
  non-finite counters;
- the pseudo-label table of the current epoch;
- the global step: the method's own `run_step`, which its train step advances.
  The CDAS plan and the augmentation are pure
  functions of (seed, step), so the step is the sampler's whole state; the epoch
  and phase follow from it;
- the noisy labels, checked on resume against the ones the run makes again.

The flags the run started with are in `<model_dir>/config.json`, written once.

Checkpoints are `tf.train.Checkpoint`s in `<model_dir>/checkpoints`, managed by a
`tf.train.CheckpointManager` that keeps the last two. TensorFlow writes a
checkpoint's files under temporary names, renames them into place, and only then
rewrites the `checkpoint` index file (itself written to a temporary file and
renamed), so a crash in the middle of a write leaves the previous checkpoint the
latest. SIGTERM is handled by TensorFlow's
`tf.distribute.experimental.PreemptionCheckpointHandler`, which saves at the
second call of the train function after the signal (`CheckpointCallback`) and
then calls our exit function.

On resume the `checkpoint` index is the record of which checkpoints exist. One
that TensorFlow cannot read is renamed `corrupt-ckpt-N.*` and dropped from the
index; files that a write cut short left beside the index's checkpoints are
renamed `orphan-ckpt-N...`. Nothing is ever deleted. A readable checkpoint that
does not fit the run (other training data, other networks) is refused and left
as it is.
"""

import glob
import itertools
import json
import os
import re
import signal
import socket
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

# The exit status of a run stopped by SIGTERM after saving a checkpoint
# (sysexits' EX_TEMPFAIL: "try again later"; re-running resumes).
PREEMPTED_EXIT_CODE = 75
# The exit status of a run stopped by Ctrl-C: 128 + SIGINT, as shells report it.
INTERRUPTED_EXIT_CODE = 130
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".galkeras.lock"
# `tf.train.CheckpointManager`'s index of the checkpoints in its directory.
INDEX_FILE = "checkpoint"
# A checkpoint's files (`ckpt-N.index`, `ckpt-N.data-…`) and the temporary
# directory TensorFlow writes them in first (`ckpt-N_temp/`), by checkpoint.
_CHECKPOINT_FILE = re.compile(r"(ckpt-\d+)(\.|_temp)")
# The noisy labels' key in a checkpoint (`RunCheckpoint`'s `noisy_labels=`).
_LABELS = "noisy_labels/"


class Preempted(Exception):
    """The run received SIGTERM and saved `checkpoint` before stopping."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        super().__init__(
            f"Preempted (SIGTERM): saved checkpoint {checkpoint}. Re-run the same "
            "command to resume from it."
        )


class Interrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C; `checkpoint` is the last one saved (None
    when there is none yet)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        super().__init__(
            f"interrupted (Ctrl-C); the last checkpoint is {checkpoint}; re-run the "
            "same command to resume from it."
            if checkpoint
            else "interrupted (Ctrl-C) before the first checkpoint; re-run the same "
            "command to start the run again."
        )


class CheckpointMismatch(ValueError):
    """A readable checkpoint that does not fit this run; it is left as it is."""


class TrainingSetChanged(CheckpointMismatch):
    """A readable checkpoint of the same run on other training data: another
    number of examples, or other noisy labels."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunCheckpoint:
    """Saves and restores the whole state of one GAL run (see the module doc).

    Args:
        gal: the compiled method (`GAL`, or a `galkeras.methods` peer); GAL's
            pseudo-label table must exist (`gal.ensure_pseudo_label_table`).
        directory: where the checkpoints go (`<model_dir>/checkpoints`).
        noisy_labels: int array `[N]`, the labels the run trains on.
        max_to_keep: how many of the newest checkpoints are kept.
    """

    def __init__(self, gal, directory, noisy_labels, max_to_keep=2):
        if getattr(gal, "pseudo_labels", ()) is None:
            raise ValueError("Make the pseudo-label table before the checkpoint.")
        self.directory = directory
        self.noisy_labels = np.asarray(noisy_labels, np.int64)
        # The run step is the method's own variable: restoring sets it, and a
        # save writes what the train steps made it.
        self.step = gal.run_step
        self.cdas_fallbacks = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._saved_labels = tf.Variable(self.noisy_labels, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            **gal.run_state(),
            progress=[self.step, self.cdas_fallbacks],
            noisy_labels=self._saved_labels,
        )
        self.max_to_keep = max_to_keep
        self.manager = self._make_manager(max_to_keep)

    def _make_manager(self, max_to_keep, directory=None):
        return tf.train.CheckpointManager(
            self.checkpoint, directory or self.directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self):
        return self.manager.latest_checkpoint

    @property
    def latest_on_disk(self):
        """The latest checkpoint that the index on disk names, the one a resume
        starts from (`latest` is ahead of it during a save)."""
        return tf.train.latest_checkpoint(self.directory)

    def restore(self, directory=None):
        """Restores the newest readable checkpoint and returns its global step
        (0 when there is none).

        A checkpoint that TensorFlow cannot read (damaged on disk, cut short, a
        file missing) is renamed `corrupt-ckpt-N.*`, never deleted, and the one
        before it is used; the index then names only the checkpoints left, and
        with none left the run starts over from step 0. Then the files of
        checkpoints the index does not name (a write cut short by Ctrl-C or a
        crash: a data file without its index, TensorFlow's temporary files) are
        renamed `orphan-ckpt-N...`.

        Args:
            directory: read from this directory instead of our own, without
                changing anything in it (a multi-worker run's non-chief workers
                read the chief's checkpoints).

        Raises:
            TrainingSetChanged: the newest readable checkpoint was trained on
                another number of examples or other noisy labels than this run's.
            CheckpointMismatch: it holds other networks or optimizers than this
                run's.
            Both leave every file as it was.
        """
        own = directory is None
        manager = self.manager if own else self._make_manager(None, directory)
        unreadable, restored = [], None
        for path in reversed(manager.checkpoints):
            if restored:
                # Older ones are read only if ever needed; a deletion of the oldest
                # cut short can have left one without all of its files.
                if not _has_files(path):
                    unreadable.append(path)
                continue
            reader, problem = _read_whole(path)
            if problem:
                logging.warning("Checkpoint %s is unreadable (%s).", path, problem)
                unreadable.append(path)
                continue
            self._check_training_set(path, reader)
            try:
                # Every object of ours matched; what the checkpoint holds beyond
                # them (the preemption handler's counter) is not ours to restore.
                self.checkpoint.restore(
                    path
                ).assert_existing_objects_matched().expect_partial()
            except (ValueError, AssertionError) as error:
                # Every tensor was read back intact: the run, not the file, differs.
                raise CheckpointMismatch(
                    f"Checkpoint {path} is readable but does not fit this run's "
                    f"networks or optimizers ({error}). It was left as it is; resume "
                    "it with the code and flags that wrote it, or start a new run "
                    "(--new_run)."
                ) from error
            restored = path
        if own:
            self._tidy(unreadable, restored)
        return int(self.step.numpy()) if restored else 0

    def _check_training_set(self, path, reader):
        """Raises `TrainingSetChanged` if checkpoint `path` (read by `reader`) was
        trained on other noisy labels than this run's."""
        key = next(
            (k for k in reader.get_variable_to_shape_map() if k.startswith(_LABELS)),
            None,
        )
        if key is None:
            return  # not our checkpoint: the restore's matching says so
        saved, now = reader.get_tensor(key), self.noisy_labels
        if saved.shape != now.shape:
            cause = f"{saved.size} examples when the run started, now {now.size}"
        elif not np.array_equal(saved, now):
            differ = int(np.sum(saved != now))
            cause = (
                f"the same {now.size} examples, but other noisy labels for {differ} "
                "of them: the data or the noise flags changed"
            )
        else:
            return
        raise TrainingSetChanged(
            f"Cannot resume from {path}: the training set changed since the run "
            f"started ({cause}). The checkpoints are left as they are: put the "
            "original data back to resume, or start a new run (--new_run)."
        )

    def _tidy(self, unreadable, restored):
        """Sets aside the `unreadable` checkpoints and the files of checkpoints the
        index does not name, and rewrites the index to the checkpoints left."""
        if unreadable:
            set_aside = [f for path in unreadable for f in _set_aside(path, "corrupt")]
            self._rewrite_index(
                [p for p in self.manager.checkpoints if p not in unreadable]
            )
            logging.warning(
                "Kept the unreadable checkpoints' files as %s; %s.",
                ", ".join(set_aside) or "(none were left)",
                f"resuming from {restored}"
                if restored
                else f"no readable checkpoint is left in {self.directory}, so the "
                "run starts over from step 0",
            )
        if not os.path.isdir(self.directory):
            return
        named = {os.path.basename(p) for p in self.manager.checkpoints}
        orphans = {}
        for file in os.listdir(self.directory):
            match = _CHECKPOINT_FILE.match(file)
            if match and not (match[1] in named and match[2] == "."):
                orphans.setdefault(match[1], []).append(file)
        for name, files in sorted(orphans.items()):
            moved = _move_aside(self.directory, sorted(files), "orphan")
            logging.warning(
                "Moved %s aside as %s: the index does not name them (a write cut "
                "short).",
                ", ".join(sorted(files)),
                ", ".join(moved),
            )

    def _rewrite_index(self, keep):
        """Makes the index name the checkpoints `keep` (oldest first, the last is
        the latest), or removes it when `keep` is empty; then re-reads it."""
        if keep:
            state = tf.train.get_checkpoint_state(self.directory)
            stamps = dict(
                zip(
                    state.all_model_checkpoint_paths,
                    state.all_model_checkpoint_timestamps,
                )
            )
            now = time.time()
            # Without their timestamps the manager would keep these checkpoints
            # forever (it deletes only those newer than the last preserved one).
            # Names relative to an absolute directory are written as they are:
            # relative, as the manager writes them, so the run can be moved.
            tf.compat.v1.train.update_checkpoint_state(
                os.path.abspath(self.directory),
                os.path.basename(keep[-1]),
                all_model_checkpoint_paths=[os.path.basename(p) for p in keep],
                all_model_checkpoint_timestamps=[stamps.get(p, now) for p in keep],
                last_preserved_timestamp=state.last_preserved_timestamp,
            )
        else:
            os.remove(os.path.join(self.directory, INDEX_FILE))
        self.manager = self._make_manager(self.max_to_keep)

    def save(self, step, cdas_fallbacks=0):
        """Writes checkpoint `ckpt-<step>` and returns its path.

        Raises:
            CheckpointWriteError: the write failed (disk full, permissions); the
                previous checkpoint is intact and the message says which it is.
        """
        self.step.assign(step)
        self.cdas_fallbacks.assign(cdas_fallbacks)
        previous = self.manager.latest_checkpoint
        try:
            return self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            kept = (
                f"The previous checkpoint {previous} is intact: free space or fix "
                "permissions, then re-run the same command to resume from it."
                if previous
                else "No earlier checkpoint exists; the run must start over."
            )
            raise CheckpointWriteError(
                f"Could not write checkpoint {step} to {self.directory}: {error}. "
                + kept
            ) from error


def _read_whole(path):
    """Reads every tensor of checkpoint `path` back, checksums checked.

    Returns:
        `(reader, None)`, or `(None, why)` when TensorFlow cannot read it.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    # IndexError: a data file shorter than its index says ("Read less bytes than
    # requested"). The reader's other faults are all OpErrors.
    except (tf.errors.OpError, IndexError) as error:
        return None, str(error).strip() or type(error).__name__
    return reader, None


def _has_files(path):
    """Whether checkpoint `path` has its index and a data file."""
    data = glob.glob(glob.escape(path) + ".data-*")
    return os.path.isfile(path + ".index") and bool(data)


def _set_aside(path, tag):
    """Renames checkpoint `path`'s files (`ckpt-N.*`) with the prefix `tag`."""
    folder, name = os.path.split(path)
    files = sorted(f for f in os.listdir(folder) if f.startswith(name + "."))
    return _move_aside(folder, files, tag)


def _move_aside(folder, files, tag):
    """Renames `files` in `folder` to `<tag>-<file>`, or `<tag>-2-<file>` and so on
    where an earlier file of that name exists: never over one. Returns the names."""
    for n in itertools.count(1):
        prefix = tag if n == 1 else f"{tag}-{n}"
        if not any(
            os.path.lexists(os.path.join(folder, f"{prefix}-{f}")) for f in files
        ):
            break
    for file in files:
        os.replace(os.path.join(folder, file), os.path.join(folder, f"{prefix}-{file}"))
    return [f"{prefix}-{file}" for file in files]


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the run every epoch, every `every_n_steps` steps if > 0, and on SIGTERM.

    It knows the run's step from `gal.host_step`, which the fit's callback list
    (`methods.base.FitCallbacks`) sets from Keras' batch index, so between
    steps it reads nothing from the device: only a save does. Before every
    save it checks for a non-finite step (`gal.nonfinite_stop`): a run that
    went non-finite under `on_nonfinite="stop"` is never saved past the fault.

    SIGTERM goes to TensorFlow's `PreemptionCheckpointHandler`, which it asks
    after every call of the train function (every `steps_per_execution` steps)
    whether to save. The handler counts those calls: the first call after the
    signal names the next call as the one to save at (on every worker of a
    multi-worker run, which must therefore ask at the same steps), and that one
    saves, then exits. Asking reads no device value (a thread event, and the
    coordination service only once a worker was preempted), so it is asked at
    every call: asking every N steps instead would leave up to 2N steps
    between the signal and the save, which must fit in the platform's grace
    period (often 30 s).

    Args:
        run_checkpoint: the run's `RunCheckpoint`, already restored.
        gal: the `GAL` (or `NoisyLabelMethod`) being trained.
        steps_per_epoch: steps of one epoch.
        every_n_steps: also save every this many global steps (0: epochs only);
            a multiple of the method's `steps_per_execution`.
        cluster_resolver: the strategy's, for the preemption handler.
    """

    def __init__(
        self,
        run_checkpoint,
        gal,
        steps_per_epoch,
        every_n_steps=0,
        cluster_resolver=None,
    ):
        super().__init__()
        self.run_checkpoint = run_checkpoint
        self.gal = gal
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_n_steps = int(every_n_steps)
        self.cluster_resolver = cluster_resolver
        # CDAS fallbacks of the run before this process (the sampler counts anew).
        self._fallbacks_before = int(run_checkpoint.cdas_fallbacks.numpy())
        self._handler = None
        self._previous_sigterm = None

    def cdas_fallbacks(self):
        """The run's CDAS fallbacks so far, earlier processes included."""
        sampler = getattr(self.gal, "sampler", None)
        return self._fallbacks_before + (sampler.fallback_count if sampler else 0)

    def on_train_begin(self, logs=None):
        every = self.gal.steps_per_execution
        if self.every_n_steps % every:
            raise ValueError(
                f"every_n_steps={self.every_n_steps} must be a multiple of "
                f"steps_per_execution={every}: callbacks run only between calls "
                "of the train function."
            )
        if self._handler is None:
            self._previous_sigterm = signal.getsignal(signal.SIGTERM)
            manager = self.run_checkpoint.manager

            def exit_fn():
                raise Preempted(manager.latest_checkpoint)

            # Restores the latest checkpoint again (the one already restored).
            self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
                self.cluster_resolver,
                manager,
                termination_config=tf.distribute.experimental.TerminationConfig(
                    exit_fn=exit_fn, save_fn=self.save
                ),
            )

    def on_train_batch_end(self, batch, logs=None):
        step = self.gal.host_step
        at_epoch_end = step % self.steps_per_epoch == 0  # saved by on_epoch_end
        if self.every_n_steps and not step % self.every_n_steps and not at_epoch_end:
            self.save(step)
        self._handler.save_checkpoint_if_preempted(step)

    def on_epoch_end(self, epoch, logs=None):
        self.save(self.gal.host_step)

    def save(self, step):
        """Saves the run at `step` (after checking for a non-finite step)."""
        self.gal.nonfinite_stop.check()
        return self.run_checkpoint.save(step, self.cdas_fallbacks())

    def close(self):
        """Gives SIGTERM back to whoever had it before training."""
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self._handler = None


class RunLock:
    """An exclusive lock on a run directory: `<model_dir>/.galkeras.lock`.

    The lock file names the holder's host and process id. A lock left by a process
    that no longer runs on this host (killed with -9, machine crash) is stale: it
    is taken over with a warning. A lock held by a live process, or by another
    host, is refused.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_FILE)
        self._held = False

    def acquire(self):
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not _is_stale(holder):
                    raise RunInUse(
                        f"{os.path.dirname(self.path)} is in use by process "
                        f"{holder.get('pid')} on {holder.get('host')} (lock file "
                        f"{self.path}). Wait for it to finish, or use another "
                        "--model_dir. If that process is gone, delete the lock file."
                    ) from None
                logging.warning(
                    "Taking over the stale lock %s (%s).", self.path, holder
                )
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._held = True
            return self
        raise RunInUse(f"Could not take the lock {self.path}; try again.")

    def _holder(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # unreadable or half-written by a process that died

    def release(self):
        if self._held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _is_stale(holder):
    """Whether the lock's process is gone (only decidable on the same host)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def check_writable(directory, what):
    """Creates `directory` if needed and proves it writable with a probe file.

    Raises:
        ValueError: naming the flag (`what`) and the reason.
    """
    from galkeras.export import write_probe

    try:
        os.makedirs(directory, exist_ok=True)
        write_probe(directory)
    except OSError as error:
        raise ValueError(
            f"{what}={directory} is not writable ({error.strerror or error}). "
            "Choose a directory you can write to."
        ) from error
