"""The performance benchmark's tiny mode, end to end: it exits 0 and writes every
part's JSON with the expected keys. No measured figure is asserted; figures depend
on the machine and its load."""

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
PARTS_1_TO_5 = ["step", "scaling", "refresh", "run", "memory"]
# Table 6 of the paper, in hours, as ratios to cross entropy's 2.1 h.
PAPER_OVER_CE = {
    "ce": 1.0,
    "coteaching": 4.3 / 2.1,
    "coteaching_plus": 4.3 / 2.1,
    "jocor": 4.4 / 2.1,
    "gal": 5.1 / 2.1,
    "gal_split": 5.1 / 2.1,  # GAL with θC from the split, beside the paper's GAL
}


def run_tiny_benchmark(out, *parts):
    result = run_python(
        os.path.join(ROOT, "benchmarks", "performance.py"),
        "--tiny",
        f"--parts={','.join(parts)}",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def read(name):
        data = json.loads((out / name).read_text())
        assert {"settings", "environment"} <= set(data)
        return data

    return read


@pytest.mark.large
def test_tiny_performance_benchmark_writes_every_part(tmp_path):
    read = run_tiny_benchmark(tmp_path, *PARTS_1_TO_5)

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
        "matmul",
    } <= set(refresh["seconds"])
    assert "refresh_per_network_over_ce_epoch" in refresh["ratios"]
    # The tiny network at 16x16x3, width 8, by hand.
    macs = 16 * 16 * 9 * (3 * 8 + 8 * 8) + 8 * 8 * 9 * (8 * 16 + 16 * 16) + 16 * 10
    mflop = refresh["arithmetic"]["forward_mflop_per_image"]
    assert mflop == pytest.approx(2 * macs / 1e6)
    assert refresh["arithmetic"]["refresh_per_network_over_ce_epoch_at_peak"] > 0

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
    assert summary["parts"] == sorted(PARTS_1_TO_5)
    assert all(
        {"name", "measured", "target", "met"} <= set(t) for t in summary["targets"]
    )
    assert (tmp_path / "tables.md").read_text().count("## ") == 6


@pytest.mark.large
def test_tiny_performance_table6_times_every_method_against_ce(tmp_path):
    # A test of its own: its five whole runs (mostly tracing) can then run on
    # another worker beside the test above, not after it.
    read = run_tiny_benchmark(tmp_path, "table6")
    table6 = read("training_time.json")
    assert table6["environment"]["cpu_count"] >= 1
    assert table6["run"]["gal_warmup_epochs"] < table6["run"]["epochs"]
    methods = table6["methods"]
    assert set(methods) == set(PAPER_OVER_CE)
    assert methods["ce"]["wall_over_ce"]["ratio"] == 1.0
    for method, row in methods.items():
        assert row["wall_seconds"] > 0 and row["seconds_per_epoch"] > 0
        assert row["wall_over_ce"]["ratio"] > 0
        assert len(row["wall_over_ce"]["rounds"]) == table6["run"]["rounds"]
        assert row["paper_over_ce"] == pytest.approx(PAPER_OVER_CE[method])
    assert table6["paper"]["colearning"]["hours"] == 5.2
    assert read("summary.json")["parts"] == ["table6"]
    tables = (tmp_path / "tables.md").read_text()
    assert "| Co-learning | not in galkeras |" in tables


@pytest.mark.large
def test_tiny_gpu_check_writes_its_json(tmp_path):
    result = run_python(
        os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--tiny", f"--out={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"tensorflow", "keras", "python", "device"} <= set(check["environment"])
    assert check["environment"]["device"] == "CPU"
    for dtype, timed in (("float32", {"ce", "gal"}), ("bfloat16", {"ce"})):
        part = check["steps"][dtype]
        assert set(part["seconds"]) == timed
        assert part["over_ce"]["ce"] == 1.0
        assert all(t > 0 for t in part["first_call_seconds"].values())
        assert set(part["peak_memory_bytes"].values()) == {None}  # no GPU
    run = check["run"]
    assert run["epochs"] == 3 and run["wall_seconds"] > run["fit_seconds"] > 0
    assert run["wall_over_floor"] == pytest.approx(
        run["wall_seconds"] / run["floor_seconds"]
    )
    assert check["paper_gal_over_ce"] == 2.43
