"""Never lose a run: checkpoints of a whole GAL run, resume, preemption, the lock.

A checkpoint holds everything a run needs to continue as if never stopped:

- θA, θB and θC with their non-trainable state (BatchNorm statistics);
- the three optimizers' slots and iteration counters (the learning-rate schedule
  and the `random` rule's draws follow the iteration counter);
- GAL's own state: the warm-up switch (`twins_split`), loss scales, the
  non-finite counters;
- the pseudo-label table of the current epoch;
- the global step. The CDAS plan and the augmentation are pure functions of
  (seed, step), so the step is the sampler's whole state; the epoch and phase
  follow from it;
- the noisy labels, checked on resume against the ones the run makes again.

The flags the run started with are in `<model_dir>/config.json`, written once.

Checkpoints are `tf.train.Checkpoint`s in `<model_dir>/checkpoints`, managed by a
`tf.train.CheckpointManager` that keeps the last two. TensorFlow writes a
checkpoint's files under temporary names, renames them into place, and only then
rewrites the `checkpoint` index file (itself written to a temporary file and
renamed), so a crash in the middle of a write leaves the previous checkpoint the
latest. SIGTERM is handled by TensorFlow's
`tf.distribute.experimental.PreemptionCheckpointHandler`, which saves at the next
step boundary and then calls our exit function.
"""

import json
import os
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
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".galkeras.lock"


class Preempted(Exception):
    """The run received SIGTERM and saved `checkpoint` before stopping."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        super().__init__(
            f"Preempted (SIGTERM): saved checkpoint {checkpoint}. Re-run the same "
            "command to resume from it."
        )


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunCheckpoint:
    """Saves and restores the whole state of one GAL run (see the module doc).

    Args:
        gal: the compiled `GAL`; its pseudo-label table must exist
            (`gal.ensure_pseudo_label_table`).
        directory: where the checkpoints go (`<model_dir>/checkpoints`).
        noisy_labels: int array `[N]`, the labels the run trains on.
        max_to_keep: checkpoints kept (the issue's "last two").
    """

    def __init__(self, gal, directory, noisy_labels, max_to_keep=2):
        if gal.pseudo_labels is None:
            raise ValueError("Make the pseudo-label table before the checkpoint.")
        self.directory = directory
        self.noisy_labels = np.asarray(noisy_labels, np.int64)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.cdas_fallbacks = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._saved_labels = tf.Variable(self.noisy_labels, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            **gal.run_state(),
            progress=[self.step, self.cdas_fallbacks],
            noisy_labels=self._saved_labels,
        )
        self.manager = self._make_manager(max_to_keep)

    def _make_manager(self, max_to_keep, directory=None):
        return tf.train.CheckpointManager(
            self.checkpoint, directory or self.directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self):
        return self.manager.latest_checkpoint

    def restore(self, directory=None):
        """Restores the newest readable checkpoint and returns its global step
        (0 when there is none).

        A checkpoint that cannot be read (cut short by a crash outside
        TensorFlow's atomic write, or damaged on disk) is renamed to
        `corrupt-ckpt-N.*`, never deleted, and the one before it is used.

        Args:
            directory: read from this directory instead of our own, without
                changing anything in it (a multi-worker run's non-chief workers
                read the chief's checkpoints).

        Raises:
            ValueError: the checkpoint's noisy labels differ from this run's.
        """
        own = directory is None
        manager = self.manager if own else self._make_manager(None, directory)
        for path in reversed(manager.checkpoints):
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as error:
                logging.warning("Checkpoint %s is unreadable (%s).", path, error)
                if own:
                    self._set_aside(path)
                continue
            if not np.array_equal(self._saved_labels.numpy(), self.noisy_labels):
                raise ValueError(
                    f"Checkpoint {path} was trained on other noisy labels than the "
                    "ones this run makes: the dataset or the noise flags changed. "
                    "Restore the original data, or start a new run (--new_run)."
                )
            if own and path != self.manager.latest_checkpoint:
                self._point_index_at(path)
            return int(self.step.numpy())
        return 0

    def _set_aside(self, path):
        folder, name = os.path.split(path)
        for file in os.listdir(folder):
            if file.startswith(name + "."):
                os.replace(
                    os.path.join(folder, file), os.path.join(folder, f"corrupt-{file}")
                )
        logging.warning(
            "Renamed %s.* to corrupt-%s.*; trying the one before.", name, name
        )

    def _point_index_at(self, path):
        keep = [p for p in self.manager.checkpoints if os.path.exists(p + ".index")]
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, path, all_model_checkpoint_paths=keep
        )
        self.manager = self._make_manager(self.manager._max_to_keep)

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


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the run every epoch, every `every_n_steps` steps if > 0, and on SIGTERM.

    It reads the run's step from `gal.global_step`, which `GAL.fit`'s driver
    keeps; the driver runs before every other callback, so a step that stopped
    the run (`NonFiniteError`) is never saved.

    Args:
        run_checkpoint: the run's `RunCheckpoint`, already restored.
        gal: the `GAL` being trained.
        steps_per_epoch: steps of one epoch.
        every_n_steps: also save every this many global steps (0: epochs only).
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
                    exit_fn=exit_fn
                ),
            )

    def on_train_batch_end(self, batch, logs=None):
        step, fallbacks = self.gal.global_step, self.cdas_fallbacks()
        # Current before the preemption handler may save through the manager.
        self.run_checkpoint.step.assign(step)
        self.run_checkpoint.cdas_fallbacks.assign(fallbacks)
        at_epoch_end = step % self.steps_per_epoch == 0  # saved by on_epoch_end
        if self.every_n_steps and not step % self.every_n_steps and not at_epoch_end:
            self.run_checkpoint.save(step, fallbacks)
        self._handler.save_checkpoint_if_preempted(checkpoint_number=step)

    def on_epoch_end(self, epoch, logs=None):
        self.run_checkpoint.save(self.gal.global_step, self.cdas_fallbacks())

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
