"""The performance benchmark's tiny mode, end to end: it exits 0 and writes every
part's JSON with the expected keys. No figure is asserted; figures depend on the
machine and its load."""

import json
import os

import pytest
from conftest import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_TIMED = {
    "ce_keras",
    "ce",
    "gal_warmup",
    "twins",
    "twins_all",
    "twins_zero_grad",
    "gal",
    "agreement",
    "apply",
    "apply_skip_closed",
    "apply_skip_open",
}


@pytest.mark.large
def test_tiny_performance_benchmark_writes_every_part(tmp_path):
    result = run_python(
        os.path.join(ROOT, "benchmarks", "performance.py"),
        "--tiny",
        f"--out={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def read(name):
        data = json.loads((tmp_path / name).read_text())
        assert {"settings", "environment"} <= set(data)
        return data

    step = read("step_time.json")["backbones"]["small_cnn"]
    assert STEP_TIMED <= set(step["seconds"])
    assert {"twins_over_ce", "gal_over_ce", "agreement_gating_over_twins"} <= set(
        step["ratios"]
    )
    assert {"ratio", "rounds"} <= set(step["ratios"]["twins_over_ce"])
    by_granularity = step["agreement_gating_by_granularity"]
    assert set(by_granularity) == {"variable", "channel", "element"}
    for entry in by_granularity.values():
        assert entry["agreement_seconds"] > 0
        assert isinstance(entry["ratio_over_twins"], float)

    scaling = read("agreement_scaling.json")
    assert len(scaling["backbones"]) >= 2
    for entry in scaling["backbones"].values():
        assert {
            "parameters",
            "variables",
            "agreement_seconds",
            "skip_restore_all_closed_seconds",
            "agreement_ns_per_parameter",
        } <= set(entry)
    assert {"agreement_slope_all", "no_faster_than_linear"} <= set(scaling["fit"])

    refresh = read("refresh.json")["backbones"]["small_cnn"]
    assert {
        "ce_epoch",
        "refresh_warmup",
        "refresh_split",
        "eval_warmup",
        "eval_split",
    } <= set(refresh["seconds"])
    assert "refresh_per_network_over_ce_epoch" in refresh["ratios"]

    run = read("whole_run.json")
    assert {"gal", "ce_gal", "ce_keras"} <= set(run["wall_seconds"])
    assert {"gal", "gal_ce_warmup", "ce_gal"} <= set(run["floor_from_parts_1_3"])
    assert {"steps", "between_epochs", "evaluation", "teardown"} <= set(
        run["profiles"]["gal"][0]["parts"]
    )
    assert {
        "gal_over_ce_gal",
        "gal_over_ce_keras",
        "gal_wall_over_floor",
        "gal_wall_over_floor_same_round",
        "gal_wall_without_teardown_over_floor",
    } <= set(run["ratios"])

    memory = read("memory.json")["backbones"]["small_cnn"]["contenders"]
    assert {"ce_keras", "gal"} <= set(memory)
    assert {"allocator_peak_bytes", "rss_peak_bytes"} <= set(memory["gal"])

    summary = read("summary.json")
    assert summary["parts"] == sorted(["step", "scaling", "refresh", "run", "memory"])
    assert all(
        {"name", "measured", "target", "met"} <= set(t) for t in summary["targets"]
    )
    assert (tmp_path / "tables.md").read_text().count("## ") == 6
