"""Two worker processes on localhost train one GAL run with
MultiWorkerMirroredStrategy, are preempted, resume, and only the chief writes the
run's artefacts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from galkeras import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _launch(tmp_path, workers, model_dir, export_dir):
    processes = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "CUDA_VISIBLE_DEVICES": "",
            "TMPDIR": str(tmp_path / f"tmp{index}"),
            "TF_CONFIG": json.dumps(
                {
                    "cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index},
                }
            ),
        }
        os.makedirs(env["TMPDIR"], exist_ok=True)
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "galkeras.train",
                    "--flagfile=flags/quickstart.flags",
                    "--strategy=multi_worker",
                    "--epochs=2",
                    "--warmup_epochs=1",
                    "--lr_decay_epochs=",
                    "--backbone_width=4",
                    "--batch_size=128",
                    "--verbose=0",
                    "--log_every_steps=5",
                    "--checkpoint_every_steps=4",
                    f"--model_dir={model_dir}",
                    f"--export_dir={export_dir}",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


@pytest.mark.large
def test_two_workers_are_preempted_resume_and_only_the_chief_writes(tmp_path):
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"

    # SIGTERM to the chief once it has a checkpoint: TensorFlow's preemption
    # handler has every worker save at the same step, and all exit with 75.
    processes = _launch(tmp_path, workers, model_dir, export_dir)
    state = model_dir / "checkpoints" / "checkpoint"
    deadline = time.time() + 300
    while not state.exists() and processes[0].poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    processes[0].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == checkpointing.PREEMPTED_EXIT_CODE, err[-3000:]
    assert not (model_dir / "summary.json").exists()

    # The same commands again: both resume from the chief's checkpoint.
    processes = _launch(tmp_path, workers, model_dir, export_dir)
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < 2 * 12  # 12 steps per epoch
    assert summary["export_path"].startswith(str(export_dir))
    # One export version, the chief's; the worker wrote only to its temp dir.
    assert sorted(os.listdir(export_dir)) == ["1"]
    # The worker resumed in a scratch directory of its own temp folder, which
    # it removed when it finished; the chief made none.
    assert str(tmp_path / "tmp1" / "galkeras-worker-") in outputs[1][1]
    for folder in ("tmp0", "tmp1"):
        assert not any(
            d.startswith("galkeras-worker-") for d in os.listdir(tmp_path / folder)
        )
    # Both workers trained the same model: the chief's summary is complete.
    assert set(summary["student"]) == {"best", "last", "best_minus_last", "last10"}
