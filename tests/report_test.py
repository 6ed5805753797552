"""The report over synthetic run directories: the Table 1 Markdown cell by cell,
the figures' plotted data, and the CLI's outputs and refusals."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import run_module

from galkeras import report

CONFIG = dict(
    dataset="cifar10",
    noise_type="sym",
    noise_rate=0.2,
    tau=0.4,
    update_rule="agreement",
    sampling="cdas",
    epochs=3,
    warmup_epochs=1,
    train_student=True,
    random_update_prob=0.8,
    seed=0,
    backbone="preact_resnet18",
)
# Fractions per epoch; θA peaks at epoch 2 (index 1), θC at the last epoch.
HISTORY = {
    "val_student_accuracy": [0.40, 0.60, 0.75],
    "loss": [2.0, 1.5, 1.2],
    "val_twin_a_accuracy": [0.50, 0.80, 0.70],
    "epoch": [0, 1, 2],
    "val_joint_accuracy": [0.55, 0.81, 0.72],
    "agreement_ratio": [1.0, 0.4, 0.3],
    "val_twin_b_accuracy": [0.52, 0.79, 0.69],
}
STEPS = [
    (2, 0, "warmup", 1.0),
    (4, 1, "agreement", 0.6),
    (6, 2, "agreement", 0.45),
]


def _networks(config):
    """The networks a run of `config` evaluates (runs without `method`: GAL)."""
    method = config.get("method", "gal")
    if method == "gal":
        return report.NETWORKS
    return ("net",) if method == "ce" else ("net1", "net2", "joint")


def _summary(config, reported, **networks):
    """summary.json with (best, last) per network; unnamed ones get (50, 40)."""
    summary = {"reported_network": reported, "dataset": config["dataset"]}
    for net in _networks(config):
        best, last = networks.get(net, (50.0, 40.0))
        summary[net] = {"best": best, "last": last, "best_minus_last": best - last}
    return summary


def write_run(root, name, summary=True, steps=True, history=None, **config):
    """A run directory as `galkeras.train` leaves it. `summary` is True (made up
    from `summary_networks`), a dict, or None for an unfinished run. Without a
    `method`, the run is GAL's, as runs made before `--method` are."""
    networks = config.pop("summary_networks", {})
    config = {**CONFIG, **config}
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    method = config.get("method", "gal")
    if summary is True:
        reported = "student" if config["train_student"] else "joint"
        if config["warmup_epochs"] >= config["epochs"] and not config["train_student"]:
            reported = "twin_a"
        if method != "gal":
            reported = _networks(config)[0]
        summary = _summary(config, reported, **networks)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if history is None and method != "gal":
        # A peer's history holds its own networks' columns instead of GAL's.
        history = {k: v for k, v in HISTORY.items() if not k.startswith("val_")}
        for gal_net, net in zip(("twin_a", "twin_b", "joint"), _networks(config)):
            history[f"val_{net}_accuracy"] = HISTORY[f"val_{gal_net}_accuracy"]
    history = HISTORY if history is None else history
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(history)
        writer.writerows(zip(*history.values()))
    if steps:
        rows = STEPS if steps is True else steps
        with open(run_dir / "steps.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                "step,epoch,phase,twin_a_loss,twin_b_loss,student_loss,"
                "agreement_ratio,agreement_param_ratio,updated_ratio".split(",")
            )
            for step, epoch, phase, ratio in rows:
                writer.writerow([step, epoch, phase, 1.0, 1.1, "nan", ratio, 0.5, 1])
    return str(run_dir)


def test_table_in_table_1_layout_with_mean_std_and_missing_cells(tmp_path):
    ce = dict(warmup_epochs=3, train_student=False)
    paths = [
        write_run(tmp_path, "gal_sym20_s0", summary_networks={"student": (93.6, 93.5)}),
        write_run(
            tmp_path, "gal_sym20_s1", seed=1, summary_networks={"student": (93.8, 93.5)}
        ),
        write_run(
            tmp_path, "ce_sym20", **ce, summary_networks={"twin_a": (86.8, 82.7)}
        ),
        write_run(
            tmp_path,
            "gal_sym50",
            noise_rate=0.5,
            summary_networks={"student": (90.5, 90.1)},
        ),
        write_run(
            tmp_path,
            "gal_sym50_tau06",
            noise_rate=0.5,
            tau=0.6,
            summary_networks={"student": (89.0, 88.0)},
        ),
        write_run(
            tmp_path,
            "gal_asym40",
            noise_type="asym",
            noise_rate=0.4,
            sampling="random",
            summary_networks={"student": (91.6, 91.2)},
        ),
        write_run(tmp_path, "unfinished", summary=None),
    ]
    clothing = _summary({"dataset": "clothing1m"}, "student", student=(74.0, 73.0)) | {
        "model_selection": {
            "monitor": "val_student_accuracy",
            "epoch": 7,
            "validation_accuracy": 70.1,
            "test_accuracy": 73.64,
        }
    }
    paths.append(
        write_run(
            tmp_path,
            "gal_c1m",
            summary=clothing,
            dataset="clothing1m",
            noise_type="none",
            noise_rate=0.5,  # unused with real noise: must not name the column
        )
    )
    text = report.table_markdown([report.load_run(p) for p in paths])
    unfinished = tmp_path / "unfinished"
    expected = f"""\
| Method | CIFAR-10 Sym 20% | | | | CIFAR-10 Sym 50% | | | | CIFAR-10 Asym 40% | | | | Clothing1M | | | |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| | Best† | Last | B−L | Last10 | Best† | Last | B−L | Last10 | Best† | Last | B−L | Last10 | Best† | Last | B−L | Last10 |
| Cross Entropy | 86.8 | 82.7 | 4.1 | 66.7 | – | – | – | – | – | – | – | – | – | – | – | – |
| ↳ paper | 86.8 | 82.7 | 4.1 | – | 79.4 | 57.9 | 21.5 | – | 85.0 | 72.3 | 12.7 | – | – | – | – | – |
| GAL | 93.7 ± 0.1 | 93.5 ± 0.0 | 0.2 ± 0.1 | 58.3 ± 0.0 | 90.5 | 90.1 | 0.4 | 58.3 | – | – | – | – | 74.0 | 73.0 | 1.0 | 58.3 |
| ↳ paper | 93.7 | 93.5 | 0.2 | – | 90.5 | 90.1 | 0.4 | – | 91.6 | 91.2 | 0.4 | – | 73.62 | – | – | – |
| GAL (sampling=random) | – | – | – | – | – | – | – | – | 91.6 | 91.2 | 0.4 | 58.3 | – | – | – | – |
| GAL (τ=0.6) | – | – | – | – | 89.0 | 88.0 | 1.0 | 58.3 | – | – | – | – | – | – | – | – |

† Best is test-selected: the test accuracy at the epoch of best test accuracy, which no practitioner can choose.

↳ paper: the paper's Tables 1 and 3 (Yan et al., Applied Sciences 2023) for the method above: Best, Last and Best−Last as printed there (its Best is test-selected too; it reports no Last10 or Selected). Table 3 (Clothing1M) prints one test accuracy per method and does not say at which epoch: it stands under Best†. The paper names its peers' backbone only in Table 1 (PreAct ResNet-18) and their training recipe nowhere; galkeras trains every method under GAL's protocol (§4.1.2).

Test accuracy (%) of the network each method reports (GAL: θC; Cross Entropy: its one network, or θA of a GAL run that is cross entropy; Co-teaching, Co-teaching+, JoCoR: net 1; θA+θB: their joint prediction), at its best epoch (Best) and last epoch (Last), and the mean over its last 10 epochs (Last10). a ± b: mean ± std over the runs of a cell.

Model selection:
- gal_c1m (GAL, Clothing1M): test at best validation epoch 7: 73.6 (validation 70.1).

Skipped {unfinished}: unfinished (no summary.json).
"""  # noqa: E501
    assert text == expected


def test_table_shows_last10_and_selected_from_the_summaries(tmp_path):
    # θC's summary with the noisy held-out protocol; the other run predates it,
    # so its Selected cell is empty and its Last10 comes from its history
    # (θC: mean of 40, 60, 75 = 58.33).
    new = _summary(CONFIG, "student", student=(93.6, 93.5))
    new["student"].update(last10=93.25, selected=93.4, selected_epoch=2)
    paths = [
        write_run(tmp_path, "new", summary=new),
        write_run(tmp_path, "old", noise_rate=0.5),
    ]
    text = report.table_markdown([report.load_run(p) for p in paths])
    lines = text.splitlines()
    assert lines[2] == "| |" + " Best† | Last | B−L | Last10 | Selected |" * 2
    assert (
        lines[3]
        == "| GAL | 93.6 | 93.5 | 0.1 | 93.2 | 93.4 | 50.0 | 40.0 | 10.0 | 58.3 | – |"
    )
    assert lines[4] == "| ↳ paper | 93.7 | 93.5 | 0.2 | – | – |" + (
        " 90.5 | 90.1 | 0.4 | – | – |"
    )
    assert "† Best is test-selected" in lines[6]
    assert "Selected: at the epoch of its best accuracy on the noisy held-out" in text


def _calibration(ece, nll, served_ece, temperature=0.2, network="student"):
    """summary.json's `calibration`: every GAL network at (ece, nll), with two
    filled bins, and the served network at `served_ece`."""
    bins = {
        "count": [0] * 4 + [3, 0, 0, 0, 0, 7],
        "confidence": [None] * 4 + [0.45, None, None, None, None, 0.95],
        "accuracy": [None] * 4 + [1.0, None, None, None, None, 0.9],
    }
    measured = {"ece": ece, "nll": nll, "reliability": bins}
    return {
        "test_examples": 10,
        "bins": 10,
        "networks": {net: dict(measured) for net in report.NETWORKS},
        "served": {
            "network": network,
            "method": "noise_corrected",
            "temperature": temperature,
            **measured,
            "ece": served_ece,
        },
    }


def test_table_shows_ece_nll_and_the_served_ece_where_runs_measured_them(tmp_path):
    measured = _summary(CONFIG, "student", student=(93.6, 93.5))
    measured["calibration"] = _calibration(0.4321, 1.23456, 0.0312)
    again = _summary(CONFIG, "student", student=(93.6, 93.5))
    again["calibration"] = _calibration(0.4121, 1.03456, 0.0112)
    paths = [
        write_run(tmp_path, "a", summary=measured),
        write_run(tmp_path, "b", summary=again),
        write_run(tmp_path, "old", noise_rate=0.5),
    ]
    text = report.table_markdown(
        [report.load_run(p) for p in paths], ablation_rows=True, paper=False
    )
    lines = text.splitlines()
    assert (
        lines[2]
        == "| |" + " Best† | Last | B−L | Last10 | ECE | NLL | ECE served |" * 2
    )
    gal = next(line for line in lines if line.startswith("| GAL |"))
    cells = [c.strip() for c in gal.split("|")[1:-1]]
    assert cells[5:8] == ["0.422 ± 0.010", "1.135 ± 0.100", "0.021 ± 0.010"]
    assert cells[12:] == ["–", "–", "–"]  # the run made before calibration
    # The joint prediction's row has its ECE, but it is not what is served.
    joint = next(line for line in lines if line.startswith("| θA+θB+GAU |"))
    assert [c.strip() for c in joint.split("|")[1:-1]][5:8] == [
        "0.422 ± 0.010",
        "1.135 ± 0.100",
        "–",
    ]
    assert "ECE (10 equal-width confidence bins)" in text


def test_reliability_figure_plots_each_network_and_the_served_bins(tmp_path):
    summary = _summary(CONFIG, "student")
    summary["calibration"] = _calibration(0.1, 0.5, 0.05, temperature=0.25)
    run = report.load_run(write_run(tmp_path, "run", summary=summary))
    fig = report.reliability_figure(run)
    lines = {line.get_gid(): line for line in fig.axes[0].lines}
    assert set(lines) == {"diagonal", "served", *report.NETWORKS}
    # Empty bins are left out.
    np.testing.assert_allclose(lines["served"].get_xdata(), [0.45, 0.95])
    np.testing.assert_allclose(lines["twin_a"].get_ydata(), [1.0, 0.9])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "served θC, t = 0.25 (ECE 0.050)" in labels
    old = report.load_run(write_run(tmp_path, "old"))
    with pytest.raises(ValueError, match="no calibration"):
        report.reliability_figure(old)


def test_table_1_with_every_method_beside_the_papers_numbers(tmp_path):
    # A GAL run made before --method (no "method" key), a --method=ce run, two
    # peers, and a peer whose own flag splits its row; the peers' summaries
    # hold net1, net2 and joint (CE's only net), not GAL's four networks.
    paths = [
        write_run(tmp_path, "gal", summary_networks={"student": (93.0, 92.0)}),
        write_run(tmp_path, "ce", method="ce", summary_networks={"net": (85.0, 80.0)}),
        write_run(
            tmp_path,
            "coteaching",
            method="coteaching",
            summary_networks={"net1": (88.0, 87.0), "net2": (99.0, 99.0)},
        ),
        # λ is set per setting in Table 1, so it does not split JoCoR's row.
        write_run(
            tmp_path,
            "jocor",
            method="jocor",
            co_lambda=0.65,
            summary_networks={"net1": (90.0, 89.5), "joint": (99.0, 99.0)},
        ),
        write_run(tmp_path, "plus_tk5", method="coteaching_plus", num_gradual=5),
    ]
    runs = [report.load_run(p) for p in paths]
    assert [report.method_label(r) for r in runs] == [
        "GAL",
        "Cross Entropy",
        "Co-teaching",
        "JoCoR",
        "Co-teaching+ (num_gradual=5)",
    ]
    assert [r.reported_network for r in runs] == [
        "student",
        "net",
        "net1",
        "net1",
        "net1",
    ]
    table = report.table_markdown(runs, paper_methods=True).splitlines()
    # Last10: θC's and net 1's history means (58.3 and 66.7), CE's net 66.7.
    assert table[:17] == [
        "| Method | CIFAR-10 Sym 20% | | | |",
        "|---|---|---|---|---|",
        "| | Best† | Last | B−L | Last10 |",
        "| Cross Entropy | 85.0 | 80.0 | 5.0 | 66.7 |",
        "| ↳ paper | 86.8 | 82.7 | 4.1 | – |",
        "| MentorNet | – | – | – | – |",
        "| ↳ paper | 86.6 | 85.2 | 1.4 | – |",
        "| Co-teaching | 88.0 | 87.0 | 1.0 | 66.7 |",
        "| ↳ paper | 87.9 | 86.5 | 1.4 | – |",
        "| Co-teaching+ | – | – | – | – |",
        "| ↳ paper | 89.5 | 88.2 | 1.3 | – |",
        "| Co-teaching+ (num_gradual=5) | 50.0 | 40.0 | 10.0 | 66.7 |",
        "| JoCoR | 90.0 | 89.5 | 0.5 | 66.7 |",
        "| ↳ paper | 90.2 | 88.9 | 1.1 | – |",
        "| Co-learning | – | – | – | – |",
        "| ↳ paper | 93.1 | 92.5 | 0.6 | – |",
        "| GAL | 93.0 | 92.0 | 1.0 | 58.3 |",
    ]
    assert table[17] == "| ↳ paper | 93.7 | 93.5 | 0.2 | – |"
    text = "\n".join(table)
    assert "Rows of – are methods without a run here (MentorNet, Co-teaching+, " in text
    assert "galkeras does not implement MentorNet and Co-learning." in text
    # Without `paper_methods`, only the methods run get the paper's line.
    short = report.table_markdown(runs).splitlines()
    assert "| MentorNet | – | – | – | – |" not in short
    assert short[3:5] == table[3:5]
    assert "Rows of –" not in "\n".join(short)
    # Outside the paper's settings there is nothing of the paper's to show.
    sym30 = report.load_run(write_run(tmp_path, "sym30", method="ce", noise_rate=0.3))
    assert report.PAPER_LINE not in report.table_markdown([sym30], paper_methods=True)
    # A peer's curves are its own networks', without GAL's warm-up line.
    lines = {
        line.get_gid(): line for line in report.accuracy_figure(runs[3]).axes[0].lines
    }
    assert {"net1", "net2", "joint"} <= set(lines) and "warmup" not in lines
    np.testing.assert_allclose(lines["net1"].get_ydata(), [50, 80, 70])
    assert lines["joint"].get_label().startswith("joint (net 1+net 2)")


def test_load_run_requires_the_reported_network_of_a_peer(tmp_path):
    summary = {"reported_network": "net1", "net2": {"best": 1, "last": 1}}
    path = write_run(tmp_path, "jocor", method="jocor", summary=summary)
    with pytest.raises(ValueError, match="summary.json lacks the net1 accuracies"):
        report.load_run(path)
    # GAL's four networks are still required of a GAL run.
    gal = _summary(CONFIG, "student")
    del gal["twin_b"]
    with pytest.raises(ValueError, match="lacks the twin_b accuracies"):
        report.load_run(write_run(tmp_path, "gal", summary=gal))


def test_paper_table_1_has_every_setting_and_best_minus_last():
    # The hand-typed numbers hold together: 7 methods x 7 settings, less
    # MentorNet's asymmetric cell, and Best−Last is Best − Last except where the
    # paper itself prints otherwise (JoCoR, CIFAR-10 Sym 20%: 1.1, not 1.3).
    assert len(report.PAPER_TABLE1) == 48
    off = {
        key
        for key, (best, last, gap) in report.PAPER_TABLE1.items()
        if f"{best - last:.1f}" != f"{gap:.1f}"
    }
    assert off == {("JoCoR", report.Setting("cifar10", "sym", 0.2))}
    # Every method of the paper's tables has its place among the rows.
    for method, _ in report.PAPER_RESULTS:
        assert method in report.METHOD_ORDER


ANIMAL10N = dict(dataset="animal10n", noise_type="none", noise_rate=0.0)


def test_table_2_sets_the_papers_animal10n_numbers_under_ours(tmp_path):
    # What `reproduce --table=2` writes: every method of the paper's Table 2,
    # the two run here with their cells, the others with the paper's only.
    paths = [
        write_run(
            tmp_path, "gal", **ANIMAL10N, summary_networks={"student": (83.5, 83.0)}
        ),
        write_run(
            tmp_path,
            "plus",
            **ANIMAL10N,
            method="coteaching_plus",
            forget_rate=0.08,
            summary_networks={"net1": (79.0, 78.0)},
        ),
    ]
    written = report.write_experiment("table2", paths, str(tmp_path / "out"))
    assert [os.path.basename(p) for p in written] == [
        "accuracy_gal.png",
        "accuracy_plus.png",
        "table.md",
    ]
    lines = (tmp_path / "out" / "table2" / "table.md").read_text().splitlines()
    assert lines[:17] == [
        "| Method | Animal-10N | | | |",
        "|---|---|---|---|---|",
        "| | Best† | Last | B−L | Last10 |",
        "| Cross Entropy | – | – | – | – |",
        "| ↳ paper | 82.68 | 81.1 | – | – |",
        "| Decoupling | – | – | – | – |",
        "| ↳ paper | 79.22 | 78.24 | – | – |",
        "| Co-teaching | – | – | – | – |",
        "| ↳ paper | 82.43 | 81.52 | – | – |",
        "| Co-teaching+ | 79.0 | 78.0 | 1.0 | 66.7 |",
        "| ↳ paper | 50.66 | 48.52 | – | – |",
        "| JoCoR | – | – | – | – |",
        "| ↳ paper | 82.88 | 81.06 | – | – |",
        "| Co-learning | – | – | – | – |",
        "| ↳ paper | 82.95 | 81.18 | – | – |",
        "| GAL | 83.5 | 83.0 | 0.5 | 58.3 |",
        "| ↳ paper | 83.33 | 82.91 | – | – |",
    ]
    assert lines[20] == (
        "↳ paper: the paper's Table 2 (Yan et al., Applied Sciences 2023) for the "
        "method above: Best, Last and Best−Last as printed there (its Best is "
        "test-selected too; it reports no Last10 or Selected). Table 2 "
        "(Animal-10N) prints no Best−Last. The paper names its peers' backbone "
        "only in Table 1 (PreAct ResNet-18) and their training recipe nowhere; "
        "galkeras trains every method under GAL's protocol (§4.1.2). Rows of – are "
        "methods without a run here (Cross Entropy, Decoupling, Co-teaching, "
        "JoCoR, Co-learning). galkeras does not implement Decoupling and "
        "Co-learning."
    )


def test_table_3_sets_the_papers_one_clothing1m_accuracy_under_best(tmp_path):
    clothing = dict(dataset="clothing1m", noise_type="none", noise_rate=0.0)
    paths = [
        write_run(
            tmp_path, "gal", **clothing, summary_networks={"student": (74.0, 73.0)}
        ),
        write_run(
            tmp_path,
            "jocor",
            **clothing,
            method="jocor",
            forget_rate=0.385,
            summary_networks={"net1": (70.0, 69.5)},
        ),
        # Not in the paper's Table 3: a row of ours without a paper line.
        write_run(
            tmp_path, "ce", **clothing, method="ce", summary_networks={"net": (68, 67)}
        ),
    ]
    runs = [report.load_run(p) for p in paths]
    lines = report.table_markdown(runs, paper_methods=True).splitlines()
    assert lines[:18] == [
        "| Method | Clothing1M | | | |",
        "|---|---|---|---|---|",
        "| | Best† | Last | B−L | Last10 |",
        "| Cross Entropy | 68.0 | 67.0 | 1.0 | 66.7 |",
        "| JoCoR | 70.0 | 69.5 | 0.5 | 66.7 |",
        "| ↳ paper | 70.3 | – | – | – |",
        "| TCNet | – | – | – | – |",
        "| ↳ paper | 71.15 | – | – | – |",
        "| ELR | – | – | – | – |",
        "| ↳ paper | 72.87 | – | – | – |",
        "| FINE | – | – | – | – |",
        "| ↳ paper | 72.91 | – | – | – |",
        "| F-div | – | – | – | – |",
        "| ↳ paper | 73.09 | – | – | – |",
        "| Label Smooth | – | – | – | – |",
        "| ↳ paper | 73.44 | – | – | – |",
        "| GAL | 74.0 | 73.0 | 1.0 | 58.3 |",
        "| ↳ paper | 73.62 | – | – | – |",
    ]
    text = "\n".join(lines)
    assert (
        "Table 3 (Clothing1M) prints one test accuracy per method and does not say "
        "at which epoch: it stands under Best†." in text
    )
    assert (
        "galkeras does not implement TCNet, ELR, FINE, F-div and Label Smooth." in text
    )


def test_method_labels_of_the_twin_ablations(tmp_path):
    twins = dict(train_student=False)
    runs = {
        rule: report.load_run(write_run(tmp_path, rule, update_rule=rule, **twins))
        for rule in ("all", "random", "agreement")
    }
    assert {rule: report.method_label(run) for rule, run in runs.items()} == {
        "all": "θA+θB+CE",
        "random": "θA+θB+Random Updating",
        "agreement": "θA+θB+GAU",
    }


def test_accuracy_figure_plots_percent_per_epoch_and_marks_best_and_last(tmp_path):
    run = report.load_run(write_run(tmp_path, "run"))
    fig = report.accuracy_figure(run)
    lines = {line.get_gid(): line for line in fig.axes[0].lines}
    epochs = [1, 2, 3]  # 1-based, like summary.json's model_selection epoch
    for net in report.NETWORKS:
        values = 100 * np.array(HISTORY[f"val_{net}_accuracy"])
        np.testing.assert_allclose(lines[net].get_xdata(), epochs)
        np.testing.assert_allclose(lines[net].get_ydata(), values)
        best = int(np.argmax(values))
        np.testing.assert_allclose(lines[f"{net}/best"].get_xdata(), [epochs[best]])
        np.testing.assert_allclose(lines[f"{net}/best"].get_ydata(), [values[best]])
        np.testing.assert_allclose(lines[f"{net}/last"].get_ydata(), [values[-1]])
    assert lines["twin_a/best"].get_xdata()[0] == 2
    np.testing.assert_allclose(lines["warmup"].get_xdata(), [1, 1])
    annotations = [t.get_text() for t in fig.axes[0].texts]
    assert "80.0" in annotations and "75.0" in annotations


def test_accuracy_figure_prefers_the_test_split_over_validation(tmp_path):
    history = {**HISTORY, **{f"test_{n}_accuracy": [0.1, 0.3, 0.2] for n in "ab"}}
    history["test_twin_a_accuracy"] = history.pop("test_a_accuracy")
    history["test_student_accuracy"] = history.pop("test_b_accuracy")
    run = report.load_run(write_run(tmp_path, "run", history=history))
    lines = {line.get_gid(): line for line in report.accuracy_figure(run).axes[0].lines}
    assert {"twin_a", "student"} <= set(lines) and "joint" not in lines
    np.testing.assert_allclose(lines["twin_a"].get_ydata(), [10, 30, 20])


def test_agreement_figure_has_a_curve_per_run_with_steps(tmp_path):
    other_steps = [(3, 0, "warmup", 1.0), (6, 1, "agreement", 0.2)]
    runs = [
        report.load_run(write_run(tmp_path, "clean", noise_type="none", noise_rate=0)),
        report.load_run(
            write_run(tmp_path, "sym80", noise_rate=0.8, steps=other_steps)
        ),
        report.load_run(write_run(tmp_path, "no_steps", steps=False)),
    ]
    ax = report.agreement_figure(runs).axes[0]
    assert [line.get_label() for line in ax.lines] == [
        "cifar10 clean",
        "cifar10 sym 80%",
    ]
    for line, steps in zip(ax.lines, (STEPS, other_steps)):
        np.testing.assert_allclose(line.get_xdata(), [s[0] for s in steps])
        np.testing.assert_allclose(line.get_ydata(), [s[3] for s in steps])
    params = report.agreement_figure(runs, "agreement_param_ratio").axes[0]
    np.testing.assert_allclose(params.lines[0].get_ydata(), [0.5, 0.5, 0.5])


def test_agreement_figure_shows_the_parameter_share_of_finer_gates(tmp_path):
    runs = [
        report.load_run(write_run(tmp_path, "whole")),
        report.load_run(write_run(tmp_path, "signs", agreement_granularity="element")),
    ]
    ax = report.agreement_figure(runs).axes[0]
    whole, signs = ax.lines
    assert signs.get_label().endswith(", element gates")
    np.testing.assert_allclose(whole.get_ydata(), [s[3] for s in STEPS])
    np.testing.assert_allclose(signs.get_ydata(), [0.5, 0.5, 0.5])
    assert "share of parameters" in ax.get_title()


def test_tau_figure_plots_joint_best_and_last_sorted_by_tau(tmp_path):
    twins = dict(train_student=False)
    runs = [
        write_run(tmp_path, "t8", tau=0.8, summary_networks={"joint": (85, 84)}),
        write_run(tmp_path, "t0", tau=0.0, summary_networks={"joint": (80, 60)}),
        write_run(tmp_path, "t4", tau=0.4, summary_networks={"joint": (90, 89)}),
        write_run(tmp_path, "asym", tau=0.4, noise_type="asym", noise_rate=0.4),
        # Not τ's business: cross entropy, ungated twins, and the peers (whose
        # configs carry GAL's default update rule and τ, unused).
        write_run(tmp_path, "ce", warmup_epochs=3, **twins),
        write_run(tmp_path, "all", update_rule="all", **twins),
        write_run(tmp_path, "jocor", method="jocor", noise_rate=0.5),
    ]
    fig = report.tau_figure([report.load_run(p) for p in runs])
    assert [ax.get_title() for ax in fig.axes] == [
        "CIFAR-10 Sym 20%",
        "CIFAR-10 Asym 40%",
    ]
    lines = {line.get_gid(): line for line in fig.axes[0].lines}
    np.testing.assert_allclose(lines["best"].get_xdata(), [0.0, 0.4, 0.8])
    np.testing.assert_allclose(lines["best"].get_ydata(), [80, 90, 85])
    np.testing.assert_allclose(lines["last"].get_ydata(), [60, 89, 84])


def test_load_run_names_the_path_and_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="nowhere: no such run directory"):
        report.load_run(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a .* it has no config.json"):
        report.load_run(str(tmp_path / "empty"))
    run_dir = write_run(tmp_path, "broken")
    os.remove(os.path.join(run_dir, "history.csv"))
    with pytest.raises(ValueError, match="broken has a summary.json but no epochs"):
        report.load_run(run_dir)


def _cli(*args):
    return run_module("galkeras.report", *args, timeout=120)


def test_cli_writes_pngs_and_the_table_from_a_directory_of_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "sym20", summary_networks={"student": (93.6, 93.5)})
    write_run(runs, "sym50", noise_rate=0.5, tau=0.6)
    out = tmp_path / "report"
    result = _cli(str(runs), f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "| GAL | 93.6 | 93.5 | 0.1 | 58.3 |" in result.stdout
    assert (out / "table.md").read_text() == result.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "accuracy_sym20.png",
        "accuracy_sym50.png",
        "agreement.png",
        "tau.png",
    ]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(os.listdir(runs / "sym20")) == [
        "config.json",
        "history.csv",
        "steps.csv",
        "summary.json",
    ]


def test_cli_refuses_a_missing_run_dir_and_an_out_dir_inside_a_run(tmp_path):
    missing = tmp_path / "no_such_run"
    result = _cli(str(missing), f"--out={tmp_path / 'report'}")
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert not (tmp_path / "report").exists()
    run_dir = write_run(tmp_path, "run")
    result = _cli(run_dir, f"--out={run_dir}/report")
    assert result.returncode != 0
    assert "inside the run directory" in result.stderr
    assert not os.path.exists(os.path.join(run_dir, "report"))
