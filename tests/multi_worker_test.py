"""Two worker processes on localhost train one GAL run with
MultiWorkerMirroredStrategy; only the chief writes the run's artefacts."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.large
def test_two_workers_finish_and_only_the_chief_writes(tmp_path):
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
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
        os.makedirs(env["TMPDIR"])
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
                    "--verbose=0",
                    "--log_every_steps=5",
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
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["export_path"].startswith(str(export_dir))
    # One export version, the chief's; the worker wrote only to its temp dir.
    assert sorted(os.listdir(export_dir)) == ["1"]
    worker_dirs = os.listdir(tmp_path / "tmp1")
    assert any(d.startswith("galkeras-worker-") for d in worker_dirs)
    assert not any(
        d.startswith("galkeras-worker-") for d in os.listdir(tmp_path / "tmp0")
    )
    # Both workers trained the same model: the chief's summary is complete.
    assert set(summary["student"]) == {"best", "last", "best_minus_last"}
