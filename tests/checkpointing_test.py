"""Checkpoints, the run lock, non-finite steps and safe loading."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_module, tiny_run_config

from galkeras import GAL, TrainingSet, checkpointing, export, train
from galkeras.model import NonFiniteError


def _gal(tiny, **options):
    make, _ = tiny
    gal = GAL(
        make("twin_a"), make("twin_b"), make("student"), warmup_epochs=1, **options
    )
    gal.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    gal.ensure_pseudo_label_table(12, 3)
    return gal


def _values(gal):
    return [np.array(v) for group in gal.run_state().values() for v in group]


# ------------------------------------------------------------ checkpoints
def test_a_write_cut_short_leaves_the_previous_checkpoint_loadable(tiny, tmp_path):
    gal = _gal(tiny)
    labels = np.arange(12) % 3
    saver = checkpointing.RunCheckpoint(gal, str(tmp_path), labels)
    saver.save(1)
    gal.student.weights[0].assign(gal.student.weights[0] + 1.0)
    saver.save(2)
    at_two = _values(gal)

    real_write = saver.checkpoint._write

    def crash_midway(prefix, options=None):
        # The data file half written, then the disk fills up.
        with open(prefix + ".data-00000-of-00001", "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    saver.checkpoint._write = crash_midway
    gal.student.weights[0].assign(gal.student.weights[0] + 1.0)
    with pytest.raises(checkpointing.CheckpointWriteError) as error:
        saver.save(3)
    assert "No space left on device" in str(error.value)
    assert "ckpt-2 is intact" in str(error.value)
    saver.checkpoint._write = real_write

    fresh = _gal(tiny)
    restored = checkpointing.RunCheckpoint(fresh, str(tmp_path), labels)
    assert restored.restore() == 2
    for got, want in zip(_values(fresh), at_two):
        np.testing.assert_array_equal(got, want)


def _damage(path, how):
    """Damages checkpoint `path` on disk as a crash, a bad disk or a user might."""
    data, index = path + ".data-00000-of-00001", path + ".index"
    if how == "garbage_index":
        with open(index, "wb") as f:
            f.write(b"not a checkpoint index")
    elif how == "zero_filled_index":
        with open(index, "r+b") as f:
            f.write(b"\x00" * os.path.getsize(index))
    elif how == "zero_filled_data":
        with open(data, "r+b") as f:
            f.write(b"\x00" * os.path.getsize(data))
    elif how == "truncated_data":
        os.truncate(data, os.path.getsize(data) // 2)
    elif how == "empty_data":
        os.truncate(data, 0)
    elif how == "missing_data":
        os.remove(data)


DAMAGE = [
    "garbage_index",
    "zero_filled_index",
    "zero_filled_data",
    "truncated_data",
    "empty_data",
    "missing_data",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_an_unreadable_latest_checkpoint_is_set_aside_not_deleted(tiny, tmp_path, how):
    gal = _gal(tiny)
    labels = np.arange(12) % 3
    saver = checkpointing.RunCheckpoint(gal, str(tmp_path), labels)
    saver.save(5)
    at_five = _values(gal)
    gal.twin_a.weights[0].assign(gal.twin_a.weights[0] * 2.0)
    _damage(saver.save(9), how)

    fresh = _gal(tiny)
    restored = checkpointing.RunCheckpoint(fresh, str(tmp_path), labels)
    assert restored.restore() == 5
    assert restored.latest.endswith("ckpt-5")
    assert tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths == [
        restored.latest
    ]
    assert (tmp_path / "corrupt-ckpt-9.index").exists()
    for got, want in zip(_values(fresh), at_five):
        np.testing.assert_array_equal(got, want)


def test_a_run_whose_checkpoints_are_all_unreadable_starts_over(tiny, tmp_path, caplog):
    gal = _gal(tiny)
    labels = np.arange(12) % 3
    _damage(
        checkpointing.RunCheckpoint(gal, str(tmp_path), labels).save(4),
        "zero_filled_data",
    )

    fresh = _gal(tiny)
    initial = _values(fresh)
    restored = checkpointing.RunCheckpoint(fresh, str(tmp_path), labels)
    assert restored.restore() == 0
    # Training begins: the preemption handler restores the latest checkpoint again.
    saver = checkpointing.CheckpointCallback(restored, fresh, steps_per_epoch=4)
    saver.on_train_begin()
    saver.close()
    assert restored.latest is None
    assert tf.train.get_checkpoint_state(str(tmp_path)) is None  # the index is gone
    assert "starts over" in caplog.text and "corrupt-ckpt-4.index" in caplog.text
    for got, want in zip(_values(fresh), initial):  # nothing half restored
        np.testing.assert_array_equal(got, want)

    # The started-over run reaches step 4 again, and its checkpoint is damaged
    # again: both damaged copies are kept.
    _damage(restored.save(4), "zero_filled_data")
    again = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels)
    assert again.restore() == 0
    kept = sorted(p.name for p in tmp_path.glob("corrupt*.index"))
    assert kept == ["corrupt-2-ckpt-4.index", "corrupt-ckpt-4.index"]
    assert not list(tmp_path.glob("ckpt-*"))


def test_after_a_recovery_the_last_two_checkpoints_are_kept(tiny, tmp_path):
    labels = np.zeros(12)
    saver = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels)
    saver.save(3)
    _damage(saver.save(6), "zero_filled_data")
    resumed = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels)
    assert resumed.restore() == 3
    resumed.save(4)
    resumed.save(5)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.index")) == [
        "ckpt-4.index",
        "ckpt-5.index",
    ]
    assert (tmp_path / "corrupt-ckpt-6.index").exists()  # not counted, not deleted


def test_restore_sets_aside_what_an_interrupted_write_left(tiny, tmp_path):
    labels = np.zeros(12)
    saver = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels)
    saver.save(3)
    saver.save(6)
    # Ctrl-C while writing checkpoint 8: its data file without its index, and
    # TensorFlow's temporary files. Not named by the index.
    (tmp_path / "ckpt-8.data-00000-of-00001").write_bytes(b"\x00" * 10)
    (tmp_path / "ckpt-8_temp").mkdir()
    (tmp_path / "ckpt-8_temp" / "part-00000-of-00001.data-00000-of-00001").touch()
    # Ctrl-C while deleting checkpoint 3, still named by the index.
    (tmp_path / "ckpt-3.index").unlink()

    resumed = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels)
    assert resumed.restore() == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint",
        "ckpt-6.data-00000-of-00001",
        "ckpt-6.index",
        "corrupt-ckpt-3.data-00000-of-00001",
        "orphan-ckpt-8.data-00000-of-00001",
        "orphan-ckpt-8_temp",
    ]
    named = tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths
    assert named == [str(tmp_path / "ckpt-6")]


def test_a_changed_training_set_is_refused_and_the_checkpoints_left_alone(
    tiny, tmp_path
):
    labels = np.arange(12) % 3
    saver = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels)
    saver.save(1)
    saver.save(2)
    before = sorted(os.listdir(tmp_path))

    bigger = _gal(tiny)
    bigger.teacher.table = None
    bigger.ensure_pseudo_label_table(20, 3)
    other = checkpointing.RunCheckpoint(bigger, str(tmp_path), np.arange(20) % 3)
    with pytest.raises(checkpointing.TrainingSetChanged) as error:
        other.restore()
    assert "the training set changed since the run started" in str(error.value)
    assert "12 examples" in str(error.value) and "20" in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before

    relabelled = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), np.zeros(12))
    with pytest.raises(checkpointing.TrainingSetChanged, match="other noisy labels"):
        relabelled.restore()
    assert sorted(os.listdir(tmp_path)) == before

    # The original data back: the run resumes.
    assert checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels).restore() == 2


def test_a_readable_checkpoint_of_other_networks_is_refused_not_set_aside(
    tiny, tmp_path
):
    labels = np.arange(12) % 3
    checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), labels).save(1)
    before = sorted(os.listdir(tmp_path))
    make, _ = tiny
    four_classes = GAL(
        *(make(name, num_classes=4) for name in ("twin_a", "twin_b", "student")),
        warmup_epochs=1,
    )
    four_classes.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    four_classes.ensure_pseudo_label_table(12, 4)
    other = checkpointing.RunCheckpoint(four_classes, str(tmp_path), labels)
    with pytest.raises(checkpointing.CheckpointMismatch, match="does not fit"):
        other.restore()
    assert sorted(os.listdir(tmp_path)) == before


def test_checkpoints_keep_the_last_two(tiny, tmp_path):
    saver = checkpointing.RunCheckpoint(_gal(tiny), str(tmp_path), np.zeros(12))
    for step in (3, 6, 9):
        saver.save(step)
    indexes = sorted(p.name for p in tmp_path.glob("*.index"))
    assert indexes == ["ckpt-6.index", "ckpt-9.index"]


# ------------------------------------------------------------------- lock
def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(directory, **holder):
    record = {"host": socket.gethostname(), "pid": os.getpid(), **holder}
    (directory / checkpointing.LOCK_FILE).write_text(json.dumps(record))


def test_the_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    lock = checkpointing.RunLock(str(tmp_path))
    with lock:
        assert (tmp_path / checkpointing.LOCK_FILE).exists()
        with pytest.raises(checkpointing.RunInUse, match=f"process {os.getpid()}"):
            checkpointing.RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / checkpointing.LOCK_FILE).exists()

    _write_lock(tmp_path, host="another-host", pid=1)
    with pytest.raises(checkpointing.RunInUse, match="on another-host"):
        checkpointing.RunLock(str(tmp_path)).acquire()

    _write_lock(tmp_path, pid=_dead_pid())  # kill -9 left it behind
    taken = checkpointing.RunLock(str(tmp_path)).acquire()
    holder = json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    taken.release()


def test_a_second_process_on_a_run_in_use_is_refused_before_training(tmp_path):
    config = tiny_run_config(tmp_path, "digits")
    os.makedirs(config.model_dir)
    _write_lock(tmp_path / "run", pid=os.getppid())  # alive: pytest's parent
    with pytest.raises(train.ConfigError, match="in use by process"):
        train.run(config)
    # The same with the other process's run under way (its config.json written).
    (tmp_path / "run" / "config.json").write_text(
        json.dumps(train.dataclasses.asdict(config))
    )
    assert train.config_problems(config) == []
    with pytest.raises(train.ConfigError, match="in use by process"):
        train.run(config)
    assert sorted(os.listdir(tmp_path / "run")) == [".galkeras.lock", "config.json"]


# ------------------------------------------------------------ CLI refusals
def _cli(*args):
    return run_module("galkeras.train", "--verbose=0", *args)


def test_resuming_with_changed_flags_is_refused_with_the_differences(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = train.TrainConfig(model_dir=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(train.dataclasses.asdict(started)))
    result = _cli(
        f"--model_dir={run_dir}", "--seed=3", "--noise_rate=0.2", "--verbose=1"
    )
    assert result.returncode == 2
    assert "--seed: 0 when the run started, now 3" in result.stderr
    assert "--noise_rate: 0.5 when the run started, now 0.2" in result.stderr
    assert "--verbose" not in result.stderr  # does not change the run
    assert "--new_run" in result.stderr
    assert sorted(os.listdir(run_dir)) == ["config.json"]  # nothing touched


def test_unwritable_model_and_export_dirs_fail_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = tiny_run_config(tmp_path, "digits", model_dir=str(blocker / "run"))
    with pytest.raises(train.ConfigError, match="--model_dir=.* is not writable"):
        train.run(config)
    config = tiny_run_config(tmp_path, "digits", export_dir=str(blocker / "export"))
    with pytest.raises(train.ConfigError, match="--export_dir .* is not a directory"):
        train.run(config)


# ------------------------------------------- Ctrl-C and changed data, in-process
def _npz(path, n=20, shift=0):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 255, (n, 6, 6), dtype=np.uint8),
        y_train=(np.arange(n) + shift) % 2,
        x_test=rng.integers(0, 255, (6, 6, 6), dtype=np.uint8),
        y_test=np.arange(6) % 2,
    )
    return f"npz:{path}"


def test_ctrl_c_and_a_changed_training_set_stop_the_run_cleanly(
    tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data.npz"
    config = tiny_run_config(
        tmp_path, _npz(data), noise_rate=0.2, checkpoint_every_steps=1
    )
    checkpoints = tmp_path / "run" / checkpointing.CHECKPOINT_DIR
    real_save = checkpointing.RunCheckpoint.save

    def ctrl_c_mid_write(self, step, cdas_fallbacks=0):
        if step == 1:
            return real_save(self, step, cdas_fallbacks)
        # Step 2's data file is written, its index not yet.
        self.checkpoint.write(os.path.join(self.directory, f"ckpt-{step}"))
        os.remove(os.path.join(self.directory, f"ckpt-{step}.index"))
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.RunCheckpoint, "save", ctrl_c_mid_write)
        with pytest.raises(KeyboardInterrupt) as interrupt:
            train.run(config)
    assert interrupt.value.checkpoint == str(checkpoints / "ckpt-1")
    assert not (tmp_path / "run" / checkpointing.LOCK_FILE).exists()
    left = sorted(os.listdir(checkpoints))
    assert left == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
        "ckpt-2.data-00000-of-00001",
    ]

    def interrupted_run(config):
        raise interrupt.value

    with monkeypatch.context() as patch:
        patch.setattr(train, "config_from_flags", lambda: config)
        patch.setattr(train, "run", interrupted_run)
        with pytest.raises(SystemExit) as exit_:
            train.main(["galkeras.train"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == (
        "galkeras.train: interrupted (Ctrl-C); the last checkpoint is "
        f"{checkpoints / 'ckpt-1'}; re-run the same command to resume from it.\n"
    )

    # Other data at the same path: refused, and nothing is touched.
    for changed, named in [
        (dict(n=24), "20 examples when the run started, now 24"),
        (dict(shift=1), "other noisy labels"),
    ]:
        _npz(data, **changed)
        with pytest.raises(train.ConfigError, match="training set changed") as error:
            train.run(config)
        assert named in str(error.value)
        assert sorted(os.listdir(checkpoints)) == left


# ------------------------------------------------------------- non-finite
class Poison(keras.layers.Layer):
    """Adds `self.value` (0, or NaN to poison a step) to its input."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.value = tf.Variable(0.0, trainable=False)

    def call(self, x):
        return x + self.value


class PoisonStep(keras.callbacks.Callback):
    """Poisons global step `at` (1-based) and records the state around it."""

    def __init__(self, gal, layer, at):
        super().__init__()
        self.gal, self.layer, self.at, self.step = gal, layer, at, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        self.layer.value.assign(float("nan") if self.step == self.at else 0.0)
        if self.step == self.at:
            self.before = _values(self.gal)

    def on_train_batch_end(self, batch, logs=None):
        if self.step == self.at:
            self.after = _values(self.gal)


def _poisoned_gal(tiny, on_nonfinite):
    make, data = tiny
    poison = Poison()
    base = make("student")
    student = keras.Model(base.input, poison(base.output), name="student")
    gal = GAL(
        make("twin_a"),
        make("twin_b"),
        student,
        warmup_epochs=1,
        on_nonfinite=on_nonfinite,
    )
    gal.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    images, labels = data(n=24)
    return gal, poison, TrainingSet(images, labels, batch_size=6, num_classes=3)


def test_skip_step_holds_back_all_three_networks_and_counts_it(tiny):
    gal, poison, training_set = _poisoned_gal(tiny, "skip_step")
    probe = PoisonStep(gal, poison, at=6)  # epoch 2, step 2: the agreement phase
    history = gal.fit(training_set, epochs=2, callbacks=[probe], verbose=0)
    groups = [name for name, group in gal.run_state().items() for _ in group]
    for name, before, after in zip(groups, probe.before, probe.after):
        if name != "gal":  # GAL's counters and last-step values move by design
            np.testing.assert_array_equal(before, after, err_msg=name)
    assert int(gal.nonfinite_steps.numpy()) == 1
    assert int(gal.nonfinite_networks.numpy()) == 0b100  # the student
    assert history.history["nonfinite_steps"] == [0.0, 1.0]
    assert all(np.isfinite(v).all() for v in _values(gal))


def test_stop_names_the_epoch_the_step_and_the_network(tiny):
    gal, poison, training_set = _poisoned_gal(tiny, "stop")
    probe = PoisonStep(gal, poison, at=7)
    with pytest.raises(NonFiniteError) as error:
        gal.fit(training_set, epochs=2, callbacks=[probe], verbose=0)
    assert (error.value.epoch, error.value.step, error.value.global_step) == (2, 3, 7)
    assert error.value.networks == ["student"]
    assert "student at epoch 2, step 3 of 4" in str(error.value)
    # Checked at the end of the epoch, one step later: step 7 and step 8 were
    # both held back, so every network and optimizer is as before step 7.
    assert probe.step == 8
    groups = [name for name, group in gal.run_state().items() for _ in group]
    for name, before, now in zip(groups, probe.before, _values(gal)):
        if name != "gal":  # GAL's counters and last-step values move by design
            np.testing.assert_array_equal(before, now, err_msg=name)


def test_a_late_stop_names_the_first_faulty_step_and_saves_nothing_after_it(
    tiny, tmp_path
):
    gal, poison, training_set = _poisoned_gal(tiny, "stop")
    gal.ensure_pseudo_label_table(training_set.num_examples, 3)
    run = checkpointing.RunCheckpoint(gal, str(tmp_path), training_set.labels)
    saver = checkpointing.CheckpointCallback(run, gal, 4, every_n_steps=2)
    probe = PoisonStep(gal, poison, at=5)
    try:
        with pytest.raises(NonFiniteError) as error:
            gal.fit(training_set, epochs=2, callbacks=[probe, saver], verbose=0)
    finally:
        saver.close()
    # Raised by the checkpoint due at step 6, which was not written.
    assert probe.step == 6 and error.value.global_step == 5
    assert run.latest_on_disk.endswith("ckpt-4")
    reader = tf.train.load_checkpoint(run.latest_on_disk)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name
    assert all(np.isfinite(v).all() for v in _values(gal))


def test_a_diverging_cli_run_stops_with_exit_3_and_keeps_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(
        "--epochs=2",
        "--warmup_epochs=1",
        "--lr_decay_epochs=",
        "--batch_size=64",
        "--backbone_width=4",
        "--lr=1e30",
        "--checkpoint_every_steps=1",
        f"--model_dir={run_dir}",
        f"--export_dir={tmp_path / 'export'}",
    )
    assert result.returncode == train.EXIT_TRAINING_FAULT, result.stderr[-2000:]
    assert "Non-finite loss or gradient in twin_a" in result.stderr
    assert "at epoch 1, step" in result.stderr
    assert "is intact" in result.stderr
    assert not (run_dir / "summary.json").exists()
    assert not (tmp_path / "export").exists()
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name


# ------------------------------------------------------------------ .keras
def test_keras_files_load_in_safe_mode(tiny, tmp_path):
    make, _ = tiny
    good = tmp_path / "student.keras"
    make("student").save(good)
    loaded = export.load_keras_model(good)
    assert loaded.name == "student"
    version = export.export_classifier(loaded, str(tmp_path / "served"))  # README
    assert version.endswith(os.path.join("served", "1"))

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    evil = tmp_path / "evil.keras"
    keras.Model(inputs, outputs).save(evil)
    with pytest.raises(ValueError, match="holds Python code"):
        export.load_keras_model(evil)
    with pytest.raises(ValueError, match="not an existing .keras file"):
        export.load_keras_model(tmp_path / "missing.keras")
