"""`--steps_per_execution=k` runs k steps per call of the train function and
changes nothing else: the same steps, checkpoints, logs and final weights as
one step per call, also across a stop and a resume at another k; a k that
cannot be honoured is refused before training."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_run_config

from galkeras import checkpointing, train

# digits at batch 180: 8 steps per epoch, 16 in all; a warm-up epoch, then an
# agreement epoch.
RUN = dict(
    dataset="digits", batch_size=180, checkpoint_every_steps=4, log_every_steps=4
)


def _run(tmp_path, name, stop_after=None, **overrides):
    """Runs `RUN` with `overrides` in `tmp_path/name`; returns the run step
    after each call of the train function and the steps checkpoints were saved
    at. `stop_after`: Ctrl-C right after that step's checkpoint."""
    config = tiny_run_config(tmp_path / name, **{**RUN, **overrides})
    calls, saved = [], []
    real_save = checkpointing.RunCheckpoint.save

    def save(self, step, cdas_fallbacks=0):
        saved.append(step)
        return real_save(self, step, cdas_fallbacks)

    real_end = checkpointing.CheckpointCallback.on_train_batch_end

    def batch_end(self, batch, logs=None):
        calls.append(self.gal.host_step)
        real_end(self, batch, logs)
        if self.gal.host_step == stop_after:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpointing.RunCheckpoint, "save", save)
        patch.setattr(checkpointing.CheckpointCallback, "on_train_batch_end", batch_end)
        if stop_after is None:
            train.run(config)
        else:
            with pytest.raises(KeyboardInterrupt):
                train.run(config)
    return calls, saved


def _files(tmp_path, name):
    """The run's history.csv and steps.csv, and every tensor of its kept
    checkpoints by checkpoint."""
    run_dir = tmp_path / name / "run"
    kept = tf.train.get_checkpoint_state(str(run_dir / "checkpoints"))
    checkpoints = {}
    for path in kept.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        checkpoints[path.rsplit("/", 1)[1]] = {
            n: reader.get_tensor(n)
            for n in reader.get_variable_to_shape_map()
            # TF's bookkeeping: the object graph, how many saves this process
            # made, and the preemption handler's count of its calls.
            if "OBJECT_GRAPH" not in n
            and not n.startswith(("save_counter", "checkpointed_runs"))
        }
    history = (run_dir / "history.csv").read_text().splitlines()
    steps = (run_dir / "steps.csv").read_text().splitlines()
    return history, steps, checkpoints


def _assert_same_tensors(got, want):
    assert got.keys() == want.keys() and len(want) > 50
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def one_step_per_call(tmp_path_factory):
    """The reference: the run at one step per call, its saves and files."""
    tmp_path = tmp_path_factory.mktemp("k1")
    calls, saved = _run(tmp_path, "k1")
    assert calls == list(range(1, 17))
    return saved, _files(tmp_path, "k1")


def test_four_steps_per_call_give_the_run_of_one(tmp_path, one_step_per_call):
    saved_1, (history_1, steps_1, checkpoints_1) = one_step_per_call
    assert saved_1 == [4, 8, 12, 16]

    calls, saved = _run(tmp_path, "k4", steps_per_execution=4)
    assert calls == [4, 8, 12, 16]
    history, steps, checkpoints = _files(tmp_path, "k4")
    assert saved == saved_1
    assert steps == steps_1  # the logged steps' own values, to 6 digits
    assert [r.split(",")[0] for r in steps[1:]] == ["4", "8", "12", "16"]
    assert history == history_1  # every epoch's means and evaluations
    assert list(checkpoints) == list(checkpoints_1) == ["ckpt-12", "ckpt-16"]
    for name in checkpoints_1:  # networks, optimizers, table, run step: bitwise
        _assert_same_tensors(checkpoints[name], checkpoints_1[name])
    assert checkpoints["ckpt-16"]["progress/0/.ATTRIBUTES/VARIABLE_VALUE"] == 16


def test_stopped_at_two_steps_per_call_resumed_at_four_gives_the_run_of_one(
    tmp_path, one_step_per_call
):
    saved_1, (history_1, steps_1, checkpoints_1) = one_step_per_call
    # Ctrl-C after the checkpoint of step 6, in the warm-up epoch.
    calls, saved = _run(
        tmp_path, "run", stop_after=6, steps_per_execution=2, checkpoint_every_steps=2
    )
    assert calls == [2, 4, 6] and saved == [2, 4, 6]
    # The rest of epoch 1 (2 steps) runs as one call of two, epoch 2 in calls
    # of four: checkpoints and logged steps stay at multiples of 4.
    calls, saved = _run(tmp_path, "run", steps_per_execution=4)
    assert calls == [8, 12, 16] and saved == [8, 12, 16]
    history, steps, checkpoints = _files(tmp_path, "run")
    assert steps == steps_1
    assert list(checkpoints) == ["ckpt-12", "ckpt-16"]
    for name in checkpoints_1:
        _assert_same_tensors(checkpoints[name], checkpoints_1[name])
    # The resumed epoch's row averages only its last 2 steps; what it evaluates
    # at the epoch's end is the same. Epoch 2 ran whole, four steps per call.
    assert history[0] == history_1[0] and history[2] == history_1[2]
    columns = history[0].split(",")
    for column, got, want in zip(
        columns, history[1].split(","), history_1[1].split(",")
    ):
        if column.startswith("val_"):
            assert got == want, column


def test_a_k_that_cannot_be_honoured_is_refused_naming_the_flag(
    tmp_path, monkeypatch, capsys
):
    config = train.TrainConfig(steps_per_execution=4, model_dir=str(tmp_path / "a"))
    problems = train.config_problems(config)
    # The default --log_every_steps=50 is no multiple of 4.
    assert problems == [
        "--log_every_steps=50 must be a multiple of --steps_per_execution=4: a "
        "step's own values are read between calls of 4 steps."
    ]
    # A peer logs no steps; its checkpoints must still fall between calls.
    peer = dataclasses.replace(config, method="ce", checkpoint_every_steps=6)
    assert train.config_problems(peer) == [
        "--checkpoint_every_steps=6 must be a multiple of --steps_per_execution=4: "
        "checkpoints are written between calls of 4 steps."
    ]
    assert train.config_problems(dataclasses.replace(config, log_every_steps=48)) == []

    # digits at batch 180 has 8 steps per epoch: 3 does not divide them. Known
    # only once the data is loaded, and still before anything is written.
    odd = tiny_run_config(
        tmp_path, "digits", batch_size=180, steps_per_execution=3, log_every_steps=3
    )
    monkeypatch.setattr(train, "config_from_flags", lambda: odd)
    with pytest.raises(SystemExit) as exit_:
        train.main(["galkeras.train"])
    assert exit_.value.code == 2
    assert "--steps_per_execution=3 must divide the 8 steps of an epoch" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written

    zero = dataclasses.replace(config, steps_per_execution=0)
    assert train.config_problems(zero) == ["--steps_per_execution=0 must be >= 1."]
