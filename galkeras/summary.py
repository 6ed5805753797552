"""The summary of a run: accuracies under each evaluation protocol, and the table
printed at the end (`summary.json` holds the same numbers)."""

import math
import os

from galkeras.calibration import WIDE_INTERVAL

# GAL's networks; a peer's are its `NETWORKS`, plus `joint` for two.
NETWORKS = ("twin_a", "twin_b", "joint", "student")
# Every network name a summary may hold, in the order tables show them.
ALL_NETWORKS = ("twin_a", "twin_b", "net", "net1", "net2", "joint", "student")
# How the summary names each reported network.
EXPORTED_NAMES = {
    "student": "θC",
    "twin_a": "θA",
    "twin_b": "θB",
    "joint": "joint prediction",
    "net": "the CE network",
    "net1": "net 1",
}
# History keys of the noisy held-out split (`--noisy_validation_split`).
HELDOUT_PREFIX = "heldout_"
# `last10`: the mean test accuracy over this many last epochs.
LAST_EPOCHS = 10


def summarise(history, warmup_epochs, reported="student"):
    """Test accuracy (percent) of each network under the evaluation protocols, and
    the mean agreement ratios over the agreement phase.

    Per network (Table 1 layout):
    - `best`: at the epoch of best *test* accuracy, so selected on the test set
      (the paper's number; no practitioner can choose an epoch that way);
    - `last`: at the last epoch; `best_minus_last`;
    - `last10`: the mean over the last `LAST_EPOCHS` epochs (all, when fewer);
    - with a noisy held-out split (`heldout_*` keys): `selected`, at the epoch
      where that network's accuracy on the held-out noisy labels peaks (the
      first such epoch), and `selected_epoch` (1-based). `selection` records the
      epoch of the `reported` network, whose `selected` is the run's result.

    With a clean validation split (`test_*` keys beside `val_*`), the test
    accuracies are the `test_*` ones, and `model_selection` gives θC's test
    accuracy at the epoch of its best validation accuracy (Clothing1M's
    protocol, Table 3).
    """
    summary = {}
    prefix = "test_" if any(k.startswith("test_") for k in history) else "val_"
    for net in (n for n in ALL_NETWORKS if f"{prefix}{n}_accuracy" in history):
        accuracies = [100.0 * a for a in history[f"{prefix}{net}_accuracy"]]
        best, last = max(accuracies), accuracies[-1]
        recent = accuracies[-LAST_EPOCHS:]
        summary[net] = {
            "best": best,
            "last": last,
            "best_minus_last": best - last,
            "last10": sum(recent) / len(recent),
        }
        heldout = history.get(f"{HELDOUT_PREFIX}{net}_accuracy")
        if heldout:
            epoch = _peak_epoch(heldout)
            summary[net].update(selected=accuracies[epoch], selected_epoch=epoch + 1)
    heldout = history.get(f"{HELDOUT_PREFIX}{reported}_accuracy")
    if heldout:
        epoch = _peak_epoch(heldout)
        summary["selection"] = {
            "monitor": f"{HELDOUT_PREFIX}{reported}_accuracy",
            "epoch": epoch + 1,
            "heldout_accuracy": 100.0 * heldout[epoch],
            "test_accuracy": summary[reported]["selected"],
        }
    if prefix == "test_":
        validation = history[f"val_{reported}_accuracy"]
        epoch = _peak_epoch(validation)
        summary["model_selection"] = {
            "monitor": f"val_{reported}_accuracy",
            "epoch": epoch + 1,
            "validation_accuracy": 100.0 * validation[epoch],
            "test_accuracy": 100.0 * history[f"test_{reported}_accuracy"][epoch],
        }
    phase2 = slice(warmup_epochs, None)
    for key in ("agreement_ratio", "agreement_param_ratio"):
        values = history.get(key, [])[phase2]
        summary[f"mean_{key}"] = float(sum(values) / len(values)) if values else None
    return summary


def _peak_epoch(values):
    """The 0-based index of the first maximum of `values`, NaN never chosen."""
    return max(
        range(len(values)),
        key=lambda i: -math.inf if math.isnan(values[i]) else values[i],
    )


def format_summary(summary):
    """The summary as a small table for the terminal."""
    networks = [n for n in ALL_NETWORKS if n in summary]
    with_selected = "selected" in summary[networks[0]]
    # Summaries written before calibration was measured have none.
    calibration = summary.get("calibration") or {}
    measured = calibration.get("networks", {})
    header = f"{'network':<10}{'best*':>8}{'last':>8}{'last10':>8}{'best-last':>11}"
    header += f"{'selected':>10}" if with_selected else ""
    lines = [header + (f"{'ECE':>8}{'NLL':>8}" if measured else "")]
    for net in networks:
        s = summary[net]
        # Summaries written before `last10` existed have none.
        last10 = f"{s['last10']:>8.2f}" if "last10" in s else f"{'n/a':>8}"
        line = f"{net:<10}{s['best']:>8.2f}{s['last']:>8.2f}{last10}"
        line += f"{s['best_minus_last']:>11.2f}"
        if with_selected:
            line += f"{s['selected']:>10.2f}"
        if measured:
            m = measured.get(net)
            line += f"{m['ece']:>8.3f}{m['nll']:>8.3f}" if m else f"{'n/a':>16}"
        lines.append(line)
    lines.append(
        "* best is test-selected (the epoch of best test accuracy); last10: mean of "
        f"the last {LAST_EPOCHS} epochs"
        + (
            "; selected: at the epoch of best noisy held-out accuracy"
            if with_selected
            else ""
        )
        + (
            "; ECE, NLL: of the last epoch's probabilities against the clean test "
            "labels, uncalibrated"
            if measured
            else ""
        )
        + "."
    )
    if calibration.get("served"):
        lines.append(served_line(calibration, summary))
    selection = summary.get("selection")
    if selection:
        lines.append(
            f"{summary['reported_network']} test accuracy at its best noisy "
            f"held-out epoch ({selection['epoch']}): {selection['test_accuracy']:.2f} "
            f"(held-out {selection['heldout_accuracy']:.2f})"
        )
    selection = summary.get("model_selection")
    if selection:
        lines.append(
            f"{summary['reported_network']} test accuracy at the best validation "
            f"epoch ({selection['epoch']}): {selection['test_accuracy']:.2f}"
        )
    ratio = summary["mean_agreement_ratio"]
    param = summary["mean_agreement_param_ratio"]
    actual = summary["noise_rate_actual"]
    lines += [
        f"noise rate (actual): {'n/a' if actual is None else f'{actual:.4f}'}",
        "mean agreement ratio (phase 2): "
        + (
            "n/a"
            if ratio is None
            else f"{ratio:.3f} of variables, {param:.3f} of parameters"
        ),
        f"seconds per epoch: {summary['seconds_per_epoch']:.2f}",
    ]
    if summary.get("dry_run"):
        return "\n".join(["dry run passed (stand-in data; nothing written):", *lines])
    if summary.get("model_dir"):  # not on the non-chief workers of a cluster
        lines.append(f"summary: {os.path.join(summary['model_dir'], 'summary.json')}")
    issues = summary.get("label_issues")
    if issues:
        lines.append(
            f"label issues: {issues['issues']} of {issues['samples']} training "
            f"labels flagged ({issues['probabilities']} probabilities): "
            f"{issues['path']}"
        )
        if issues.get("clean_labels_path"):
            lines.append(
                f"cleaned labels ({issues['clean_labels']}): "
                f"{issues['clean_labels_path']} (train again with "
                "--labels_csv=that file)"
            )
    if summary.get("export_path"):
        exported = EXPORTED_NAMES.get(summary.get("reported_network"), "θC")
        lines.append(f"exported {exported}: {summary['export_path']}")
    return "\n".join(lines)


def served_line(calibration, summary):
    """What the export serves: its temperature, where `T` came from and where
    the fit ran, the test ECE and NLL before and after, or why it is not
    calibrated."""
    served = calibration["served"]
    network = served["network"]
    before = calibration["networks"].get(network)
    name = EXPORTED_NAMES.get(network, network)
    keras_file = f"{network}.keras"
    if served["method"] == "none":
        why = (
            f"--calibrate=noise_corrected fell back to none: {served['fallback']}"
            if served.get("fallback")
            else "--calibrate=none"
        )
        return f"served {name} probabilities: uncalibrated ({why})"
    transition = {
        "known": "known from the synthetic noise",
        "estimated": "estimated by confident learning",
    }[served["transition"]]
    where = {
        "heldout": f"the {served['fit_samples']} held-out labels",
        "training_set": f"the {served['fit_samples']} training-set labels (no "
        "--noisy_validation_split: in-sample)",
    }[served["fitted_on"]]
    line = (
        f"served {name} probabilities: noise-corrected temperature "
        f"{served['temperature']:.4g}"
        + (" (at the end of its search range)" if served.get("at_bound") else "")
        + (
            " (95% interval {:.3g}-{:.3g})".format(*served["interval"])
            if served.get("interval")
            else ""
        )
        + f", T {transition}, fitted on {where}"
    )
    if served["transition"] == "estimated":
        line += (
            "; an estimated T tends to overstate the noise (confident learning "
            "counts the network's own mistakes), which over-sharpens: check the "
            "served probabilities against clean labels if you have any"
        )
    interval = served.get("interval")
    if interval and interval[1] > WIDE_INTERVAL * interval[0]:
        line += (
            "; the interval is wide, so t is loosely determined: hold out more "
            "labels (--noisy_validation_split) for a surer fit"
        )
    if before:
        line += (
            f"; test ECE {before['ece']:.3f} -> {served['ece']:.3f}, NLL "
            f"{before['nll']:.3f} -> {served['nll']:.3f}"
        )
    if summary.get("keras_path"):
        line += f"; {keras_file} stays uncalibrated"
    return line
