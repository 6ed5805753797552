"""The memorisation benchmark's quick mode, end to end on real Fashion-MNIST."""

import json
import os
import sys

import pytest
from conftest import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = os.path.join(ROOT, "..", "shared", "data", "fashion_mnist.npz")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import memorisation  # noqa: E402


@pytest.mark.large
def test_quick_benchmark_runs_controls_and_random_matches_its_gate(tmp_path):
    assert os.path.exists(NPZ), f"{NPZ} is missing: ../shared must sit beside the repo"
    out = tmp_path / "bench"
    result = run_python(
        os.path.join(ROOT, "benchmarks", "memorisation.py"),
        "--quick",
        f"--out={out}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]["quick"]["sym50"]
    assert set(runs) == set(memorisation.QUICK_METHODS)
    ce = runs["ce"]["0"]
    for key in ("best", "last", "last10", "selected"):
        assert 0.0 <= ce["net"][key] <= 100.0
    # CE is --method=ce, and its fit of the noisy training labels is kept.
    assert ce["reported_network"] == "net"
    assert len(ce["history"]["train_noisy_net_accuracy"]) == 4
    # The random control opens, in expectation, the share its gate opened.
    gate = runs["gal_element"]["0"]["mean_agreement_param_ratio"]
    flags_text = (
        out / "runs" / "quick" / "sym50" / "seed0" / "random_element" / "run.flags"
    )
    assert f"--random_update_prob={round(gate, 6)}" in flags_text.read_text()
    # Stop and distil: τ = 1 at variable granularity opens (almost) nothing.
    assert runs["stop"]["0"]["mean_agreement_param_ratio"] < 0.05
    table = (out / "table.md").read_text()
    assert "best (test-selected)" in table and "| sym50 |" in table
    assert (out / "curves.png").stat().st_size > 0


def test_verdicts_against_a_hand_computation():
    def summary(net, selected, last):
        return {net: {"selected": selected, "last": last}}

    runs = {
        "ce": {"0": summary("net", 60.0, 50.0), "1": summary("net", 62.0, 48.0)},
        "stop": {
            "0": summary("student", 63.0, 61.0),
            "1": summary("student", 63.0, 61.0),
        },
        "gal_element": {
            "0": summary("student", 66.0, 62.0),
            "1": summary("student", 67.0, 63.0),
        },
    }
    (row,) = memorisation.verdicts({"r": {"sym50": runs}})
    # selected: gate 66.5 vs early-stopped CE 61.0 (spread 2) and stop 63.0 (0).
    assert row["selected"]["minus_early_stopped_ce"] == pytest.approx(5.5)
    assert row["selected"]["minus_stop_and_distil"] == pytest.approx(3.5)
    assert row["selected"]["spread"] == pytest.approx(2.0)
    assert row["selected"]["beats_both"]
    # last: gate 62.5 is 1.5 above early-stopped CE, less than CE's seed spread 2.
    assert row["last"]["minus_early_stopped_ce"] == pytest.approx(1.5)
    assert not row["last"]["beats_both"]


def test_stored_runs_are_kept_unless_re_run_or_of_an_older_definition(tmp_path):
    def run(network, value):
        return {"reported_network": network, network: {"last": value}}

    settings = {"r": {"epochs": 40}}
    stored = {
        "regimes": {"r": {"epochs": 40}, "old": {"epochs": 20}},
        "runs": {
            "r": {
                "sym50": {
                    "stop": {"0": run("student", 1.0), "1": run("student", 2.0)},
                    # `ce` as it was: GAL's θA with W = E.
                    "ce": {"0": run("twin_a", 3.0), "1": run("twin_a", 4.0)},
                }
            },
            "old": {"sym50": {"stop": {"0": run("student", 5.0)}}},
        },
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(stored))
    on_disk = {
        "r": {
            "sym50": {
                "ce": {"0": run("net", 6.0)},
                "stop": {"1": run("student", 7.0)},
            }
        }
    }
    merged = memorisation.merge_committed(on_disk, str(path), settings)
    assert merged == {
        "r": {
            "sym50": {
                "stop": {"0": run("student", 1.0), "1": run("student", 7.0)},
                "ce": {"0": run("net", 6.0)},
            }
        }
    }
    assert memorisation.merge_committed(on_disk, str(tmp_path / "no"), {}) is on_disk


def test_jobs_start_a_random_controls_gate_first(tmp_path, monkeypatch):
    # Two at a time: the gate starts beside CE, so that its random control
    # does not run alone after every other run.
    started = []

    class Finished:
        returncode = 0

        def poll(self):
            return 0

    def start_training(run_dir, flagfile):
        started.append(os.path.basename(run_dir))
        os.makedirs(os.path.join(run_dir, "run"))
        with open(os.path.join(run_dir, "run", "summary.json"), "w") as f:
            json.dump({"mean_agreement_param_ratio": 0.25}, f)
        return Finished()

    monkeypatch.setattr(memorisation, "start_training", start_training)
    monkeypatch.setattr(memorisation, "make_subset", lambda *a: "subset.npz")
    setting = tmp_path / "runs" / "quick" / "sym50" / "seed0"
    jobs = [
        memorisation.Job("quick", "sym50", 0, m, str(setting / m))
        for m in memorisation.QUICK_METHODS
    ]
    regimes = memorisation.QUICK_REGIMES
    memorisation.run_jobs(jobs, str(tmp_path), regimes, "unused.npz", 2, print)
    assert started == ["gal_element", "ce", "stop", "random_element"]
    flags_text = (setting / "random_element" / "run.flags").read_text()
    assert "--random_update_prob=0.25" in flags_text
