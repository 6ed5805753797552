"""Never lose a run, end to end through the CLI: SIGTERM and kill -9 mid-run,
resume, and the resumed run's final state equals an uninterrupted one's. The
uninterrupted reference is another process, so this is also the test that
`--deterministic` runs are bit-identical from process to process."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import CLI_ENV, REPO, run_module

from galkeras import checkpointing

# digits: 1,437 training images, batch 64 -> 23 steps per epoch, 46 in all; a
# warm-up epoch, then an agreement epoch at a tenth of the learning rate.
FLAGS = [
    "--flagfile=flags/quickstart.flags",
    "--epochs=2",
    "--warmup_epochs=1",
    "--lr_decay_epochs=1",
    "--batch_size=64",
    "--backbone_width=4",
    "--verbose=0",
    "--log_every_steps=5",
    "--checkpoint_every_steps=7",
    "--deterministic",
]
TOTAL_STEPS = 46


def _args(tmp_path, name, *extra, flags=FLAGS):
    return [
        *flags,
        f"--model_dir={tmp_path / name}",
        f"--export_dir={tmp_path / name}_export",
        *extra,
    ]


def _run(tmp_path, name, *extra, flags=FLAGS):
    return run_module("galkeras.train", *_args(tmp_path, name, *extra, flags=flags))


def _latest_step(run_dir):
    """The step of the run's latest complete checkpoint, 0 if none."""
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    return 0 if path is None else int(path.rsplit("-", 1)[1])


def _interrupt(tmp_path, name, how, flags=FLAGS, after_step=0):
    """Starts (or resumes) a run, waits for a checkpoint past `after_step`, then
    sends `how`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "galkeras.train", *_args(tmp_path, name, flags=flags)],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while (
        _latest_step(tmp_path / name) <= after_step
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=300)  # also reaps it: no zombie pid
    return process.returncode, stderr


def _final_state(run_dir):
    """Every tensor of the run's latest checkpoint, by name."""
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    names = [
        n
        for n in reader.get_variable_to_shape_map()
        # TF's bookkeeping: the object graph, how many saves were made, and the
        # preemption handler's count of its calls at a SIGTERM save.
        if "OBJECT_GRAPH" not in n
        and not n.startswith(("save_counter", "checkpointed_runs"))
    ]
    return path, {n: reader.get_tensor(n) for n in names}


@pytest.mark.large
def test_a_preempted_then_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = _run(tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]

    # SIGTERM after the first checkpoint: a checkpoint at the next step
    # boundary, then the distinct exit code.
    code, stderr = _interrupt(tmp_path, "run", signal.SIGTERM)
    assert code == checkpointing.PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert "Preempted (SIGTERM): saved checkpoint" in stderr
    preempted_at = _latest_step(tmp_path / "run")
    assert 0 < preempted_at < TOTAL_STEPS
    assert not (tmp_path / "run" / checkpointing.LOCK_FILE).exists()

    # The same run resumed, then killed with kill -9 after its next checkpoint:
    # no chance to clean up.
    code, stderr = _interrupt(tmp_path, "run", signal.SIGKILL, after_step=preempted_at)
    assert code == -signal.SIGKILL, stderr[-2000:]
    killed_at = _latest_step(tmp_path / "run")
    assert preempted_at < killed_at < TOTAL_STEPS
    assert not (tmp_path / "run" / "summary.json").exists()
    assert (tmp_path / "run" / checkpointing.LOCK_FILE).exists()  # stale now

    resumed = _run(tmp_path, "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at

    ref_path, ref = _final_state(tmp_path / "reference")
    path, state = _final_state(tmp_path / "run")
    assert ref_path.endswith(f"ckpt-{TOTAL_STEPS}")
    assert path.endswith(f"ckpt-{TOTAL_STEPS}")
    assert state.keys() == ref.keys()
    for key in ref:  # networks, optimizers, the table: bit for bit
        np.testing.assert_array_equal(state[key], ref[key], err_msg=key)

    # The logs hold each epoch and each logged step exactly once.
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["0", "1"]
    steps = (tmp_path / "run" / "steps.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in steps] == list(range(5, TOTAL_STEPS + 1, 5))

    # Everything the run reports is the reference's, but where and how long.
    ref_summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    for s in (summary, ref_summary):
        for key in ("seconds_per_epoch", "model_dir", "export_path", "keras_path"):
            s.pop(key)
        s.pop("resumed_from_step", None)
        s["label_issues"].pop("path")
    assert summary == ref_summary
    run_issues, ref_issues = (
        (tmp_path / n / "label_issues.csv").read_bytes() for n in ("run", "reference")
    )
    assert run_issues == ref_issues

    # (A finished run, re-run, is reported and not retrained: train_test's
    # test_run_on_npz_in_process.)


@pytest.mark.large
def test_a_killed_peer_run_resumes_to_the_uninterrupted_result(tmp_path):
    # JoCoR: two networks, one joint loss and the forget-rate ramp in the graph.
    # digits at batch 128: 12 steps per epoch, 24 in all.
    flags = [
        "--dataset=digits",
        "--method=jocor",
        "--epochs=2",
        "--lr_decay_epochs=1",
        "--batch_size=128",
        "--backbone_width=4",
        "--verbose=0",
        "--checkpoint_every_steps=4",
        "--deterministic",
    ]
    reference = _run(tmp_path, "reference", flags=flags)
    assert reference.returncode == 0, reference.stderr[-2000:]
    code, stderr = _interrupt(tmp_path, "killed", signal.SIGKILL, flags=flags)
    assert code == -signal.SIGKILL, stderr[-2000:]
    resumed = _run(tmp_path, "killed", flags=flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < 24

    ref_path, ref = _final_state(tmp_path / "reference")
    path, state = _final_state(tmp_path / "killed")
    assert ref_path.endswith("ckpt-24") and path.endswith("ckpt-24")
    assert state.keys() == ref.keys()
    for key in ref:  # both networks, both optimizers, the run step: bit for bit
        np.testing.assert_array_equal(state[key], ref[key], err_msg=key)
    ref_summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    for net in ("net1", "net2", "joint"):
        assert summary[net] == ref_summary[net]
