"""The memorisation benchmark's quick mode, end to end on real Fashion-MNIST."""

import json
import os

import pytest
from conftest import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = os.path.join(ROOT, "..", "shared", "data", "fashion_mnist.npz")


@pytest.mark.large
def test_quick_benchmark_runs_and_ce_memorises(tmp_path):
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
    runs = results["runs"]["sym50"]
    assert set(runs) == {"ce", "all", "gal", "random", "gal_early"}
    table = (out / "table.md").read_text()
    assert "| sym50 |" in table and "GAL (θC)" in table
    # CE fits the noisy training labels better than it predicts the clean test set:
    # the signature of memorisation. No margin of GAL over CE is asserted.
    ce = runs["ce"]["history"]
    assert ce["train_label_agreement"][-1] > ce["val_twin_a_accuracy"][-1]
    for method in ("all", "gal", "random"):
        history = runs[method]["history"]
        assert 0.0 <= history["agreement_param_ratio"][-1] <= 1.0
        assert "pseudo_label_precision" in history
