"""The CLI end to end on `digits`, its export, and every bad-input case."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import CLI_ENV, run_module, tiny_run_config

from galkeras import (
    agreement,
    augment,
    backbones,
    calibration,
    checkpointing,
    model,
    noise,
    run_directory,
    run_logging,
    sampling,
    train,
)

ENV = CLI_ENV


def _cli(*args, cwd):
    return run_module("galkeras.train", *args, cwd=cwd)


def test_cli_choices_match_the_library():
    assert train.NOISE_TYPES[: len(noise.NOISE_TYPES)] == noise.NOISE_TYPES
    assert train.BACKBONES == backbones.BACKBONES
    assert train.UPDATE_RULES == agreement.UPDATE_RULES
    assert train.SAMPLING_MODES == sampling.SAMPLING_MODES
    assert train.MASKED_UPDATES == model.MASKED_UPDATES
    assert train.STUDENT_STARTS == model.STUDENT_STARTS
    assert train.GRANULARITIES == agreement.GRANULARITIES
    assert train.ON_NONFINITE == model.ON_NONFINITE
    assert train.LOCK_FILE == checkpointing.LOCK_FILE
    assert train.AUGMENTATIONS == ("auto", *augment.AUGMENTATIONS)
    assert train.CALIBRATIONS == calibration.METHODS


@pytest.mark.large
def test_cli_trains_digits_writes_summary_and_a_servable_export(tmp_path):
    result = _cli(
        "--flagfile=" + os.path.abspath("flags/quickstart.flags"),
        "--epochs=3",
        "--warmup_epochs=1",
        "--lr_decay_epochs=2",
        "--batch_size=128",
        "--backbone_width=8",
        "--verbose=0",
        f"--model_dir={tmp_path / 'run'}",
        f"--export_dir={tmp_path / 'export'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student" in result.stdout and "exported" in result.stdout
    assert (
        "label issues:" in result.stdout and "(student probabilities)" in result.stdout
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for net in ("twin_a", "twin_b", "joint", "student"):
        s = summary[net]
        assert 0 <= s["last"] <= s["best"] <= 100
        assert s["best_minus_last"] == pytest.approx(s["best"] - s["last"])
    assert 0.45 < summary["noise_rate_actual"] < 0.55
    assert summary["seconds_per_epoch"] > 0
    assert 0 <= summary["mean_agreement_ratio"] <= 1
    assert summary["export_path"] == str(tmp_path / "export" / "1")
    per_variable = (tmp_path / "run" / "agreement_per_variable.csv").read_text()
    rows = [line.split(",") for line in per_variable.strip().splitlines()]
    assert rows[0][0] == "epoch" and rows[1][1:] and len(rows) == 4
    assert all(0.0 <= float(x) <= 1.0 for row in rows[1:] for x in row[1:])
    import csv

    with open(tmp_path / "run" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert (
        "pseudo_label_coverage" in history[0] and "val_student_accuracy" in history[0]
    )
    # Averaged over variables, the per-variable open fractions are the epoch's
    # agreement ratio (both are means over the same steps).
    for row, epoch in zip(rows[1:], history):
        mean_open = np.mean([float(x) for x in row[1:]])
        assert mean_open == pytest.approx(float(epoch["agreement_ratio"]), abs=1e-3)
    labels = np.load(tmp_path / "run" / "labels.npz")
    assert (labels["noisy_labels"] != labels["clean_labels"]).mean() == pytest.approx(
        summary["noise_rate_actual"]
    )

    # θC in this process, against the SavedModel in a fresh process.
    import keras

    from galkeras.datasets import load_dataset

    images = load_dataset("digits").x_test[:50]
    np.save(tmp_path / "images.npy", images)
    # student.keras is uncalibrated; the export divides its logits by t.
    student = keras.models.load_model(tmp_path / "run" / "student.keras")
    logits = student.predict(images, verbose=0)
    served = summary["calibration"]["served"]
    t = served["temperature"]
    if served["fallback"]:
        # θC of a 3-epoch run can be near chance, which leaves t open: the
        # run serves t = 1 and says why (tests/calibration_test.py checks a fit).
        assert t == 1.0 and "do not determine the temperature" in served["fallback"]
    else:
        assert served["transition"] == "known" and t != 1.0
    want = keras.ops.softmax(logits / t).numpy()
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "sig = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = sig(image=tf.constant(np.load(sys.argv[2])))\n"
        "out = {k: v.numpy() for k, v in out.items()}\n"
        "out['class_name'] = out['class_name'].astype(str)\n"
        "np.savez(sys.argv[3], **out)\n"
    )
    served = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            summary["export_path"],
            str(tmp_path / "images.npy"),
            str(tmp_path / "served.npz"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    got = np.load(tmp_path / "served.npz")
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    np.testing.assert_array_equal(got["class_id"], logits.argmax(1))
    assert got["class_id"].dtype == np.int64
    np.testing.assert_array_equal(got["class_name"], logits.argmax(1).astype(str))

    # A second export goes to version 2 and leaves version 1 untouched; a second
    # run into the same model_dir is refused.
    from galkeras.export import export_classifier

    before = sorted(os.listdir(summary["export_path"]))
    assert export_classifier(student, str(tmp_path / "export")).endswith("2")
    assert sorted(os.listdir(summary["export_path"])) == before
    again = _cli(f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert again.returncode != 0 and "--model_dir" in again.stderr


def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (20, 6, 6), dtype=np.uint8),
        "y_train": np.arange(20) % 2,
        "x_test": rng.integers(0, 255, (6, 6, 6), dtype=np.uint8),
        "y_test": np.arange(6) % 2,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return f"--dataset=npz:{path}"


BAD_FLAGS = [
    (["--strategy=tpu_pod"], "--strategy"),
    (["--strategy=multi_worker"], "TF_CONFIG is not set"),
    (["--mixed_precision=float8"], "--mixed_precision"),
    (["--backbone=resnet34", "--hidden_units=8"], "--hidden_units"),
    (["--pretrained_weights=imagenet"], "--pretrained_weights"),
    (["--backbone=resnet50", "--pretrained_weights=/no/such.h5"], "/no/such.h5"),
    (["--log_every_steps=0"], "--log_every_steps"),
    (["--noise_rate=1.0"], "--noise_rate"),
    (["--noise_rate=-0.1"], "--noise_rate"),
    (["--tau=1.5"], "--tau"),
    (["--epsilon=1.0"], "--epsilon"),
    (["--dataset=imagenet21k"], "imagenet21k"),
    (["--backbone=vgg99"], "--backbone"),
    (["--student_backbone=vgg99"], "--student_backbone"),
    (["--sampling=balanced"], "--sampling"),
    (["--update_rule=sometimes"], "--update_rule"),
    (["--masked_update=freeze"], "--masked_update"),
    (["--noise_type=gaussian"], "--noise_type"),
    (["--batch_size=0"], "--batch_size"),
    (["--epochs=5", "--warmup_epochs=6", "--lr_decay_epochs=2"], "--warmup_epochs"),
    (["--lr_decay_epochs=x"], "--lr_decay_epochs"),
    (["--calibrate=platt"], "--calibrate"),
    (["--jit_compile=maybe"], "--jit_compile"),
    (["--student_start=later"], "--student_start"),
]


def test_unknown_agreement_granularity_exits_2_naming_flag_and_choices(tmp_path):
    result = _cli(
        "--agreement_granularity=layer", f"--model_dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "--agreement_granularity='layer'" in result.stderr
    assert all(f"'{choice}'" in result.stderr for choice in train.GRANULARITIES)


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[f[0][0] for f in BAD_FLAGS])
def test_bad_flags_exit_nonzero_naming_the_flag(tmp_path, flags, named):
    result = _cli(*flags, f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


BAD_NPZ = [
    ({"y_test": None}, "y_test"),
    ({"y_train": np.arange(19) % 2}, "y_train"),
    ({"y_train": np.arange(20) % 2 - 1}, "y_train"),
    # K comes from class_names, so label 7 lies outside [0, 2).
    (
        {"y_test": np.array([0, 1, 0, 1, 0, 7]), "class_names": np.array(["a", "b"])},
        "y_test",
    ),
]
BAD_NPZ_IDS = ["missing_key", "mismatched_lengths", "negative_label", "label_beyond_k"]


@pytest.mark.parametrize("overrides,named", BAD_NPZ, ids=BAD_NPZ_IDS)
def test_bad_npz_is_refused_naming_the_key(tmp_path, overrides, named):
    # In process: the command line's exit code for the same refusal is the
    # next test's (one CLI start-up instead of four).
    flag = _npz(tmp_path / "data.npz", **overrides)
    config = tiny_run_config(tmp_path, flag.split("=", 1)[1])
    with pytest.raises(train.ConfigError) as refused:
        train.run(config)
    assert named in str(refused.value) and "data.npz" in str(refused.value)


def test_bad_npz_exits_2_naming_the_key(tmp_path):
    flag = _npz(tmp_path / "data.npz", y_test=None)
    result = _cli(flag, f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "y_test" in result.stderr and "data.npz" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_on_npz_in_process(tmp_path):
    flag = _npz(tmp_path / "data.npz")
    config = tiny_run_config(tmp_path, flag.split("=", 1)[1], noise_rate=0.2)
    summary = train.run(config)
    assert summary["dataset"] == "data" and os.path.isdir(summary["export_path"])
    # The same run again is finished: reported, not retrained or re-exported.
    again = train.run(config)
    assert "already finished" in again["already_finished"]
    assert again["export_path"] == summary["export_path"]
    assert sorted(os.listdir(tmp_path / "export")) == ["1"]
    # --new_run: a new run beside it, the old one untouched.
    new = train.run(dataclasses.replace(config, new_run=True))
    assert new["model_dir"].startswith(config.model_dir + "-")
    assert "already_finished" not in new
    assert sorted(os.listdir(tmp_path / "export")) == ["1", "2"]


def test_a_missing_folder_dataset_is_refused(tmp_path):
    # In process; test_bad_npz_exits_2_naming_the_key covers the exit code.
    config = tiny_run_config(tmp_path, f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(train.ConfigError, match="nowhere is not a directory"):
        train.run(config)


def test_run_with_sync_batchnorm_and_bfloat16_in_process(tmp_path):
    flag = _npz(tmp_path / "data.npz")
    config = tiny_run_config(
        tmp_path,
        flag.split("=", 1)[1],
        strategy="one_device",
        sync_batchnorm=True,
        mixed_precision="bfloat16",
    )
    summary = train.run(config)
    assert os.path.isdir(summary["export_path"])
    import keras

    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    student = keras.saving.load_model(tmp_path / "run" / "student.keras")
    norms = [
        layer
        for layer in student.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms and all(layer.synchronized for layer in norms)
    assert student.layers[2].compute_dtype == "bfloat16"


def _history(test, heldout=None, agreement=None):
    """A `history.csv` dict: the same test (and held-out) fractions for every
    network, θC's scaled by a half so that the networks differ."""
    history = {}
    for net in train.NETWORKS:
        scale = 0.5 if net == "student" else 1.0
        history[f"val_{net}_accuracy"] = [scale * a for a in test]
        if heldout is not None:
            history[f"heldout_{net}_accuracy"] = list(heldout)
    history["agreement_ratio"] = agreement or [1.0] * len(test)
    history["agreement_param_ratio"] = agreement or [1.0] * len(test)
    return history


def test_summarise_last10_and_selected_by_hand():
    # 12 epochs: last10 averages epochs 3..12; the held-out accuracy peaks
    # first at epoch 4 (index 3), where the test accuracy is 0.30.
    test = [0.10, 0.20, 0.25, 0.30, 0.50, 0.60, 0.40, 0.40, 0.40, 0.40, 0.40, 0.20]
    heldout = [0.1, 0.2, 0.3, 0.9, 0.5, 0.5, 0.9, 0.4, 0.4, 0.4, 0.4, 0.4]
    summary = train.summarise(_history(test, heldout), warmup_epochs=2)
    twin_a = summary["twin_a"]
    assert twin_a["best"] == pytest.approx(60.0)
    assert twin_a["last"] == pytest.approx(20.0)
    assert twin_a["best_minus_last"] == pytest.approx(40.0)
    assert twin_a["last10"] == pytest.approx(385.0 / 10)
    assert twin_a["selected"] == pytest.approx(30.0)
    assert twin_a["selected_epoch"] == 4
    assert summary["student"]["selected"] == pytest.approx(15.0)
    assert summary["selection"] == {
        "monitor": "heldout_student_accuracy",
        "epoch": 4,
        "heldout_accuracy": pytest.approx(90.0),
        "test_accuracy": pytest.approx(15.0),
    }
    # Cross entropy reports θA, whose own peak selects.
    ce = train.summarise(_history(test, heldout), warmup_epochs=12, reported="twin_a")
    assert ce["selection"]["monitor"] == "heldout_twin_a_accuracy"
    assert ce["selection"]["test_accuracy"] == pytest.approx(30.0)
    text = train.format_summary(
        {
            **summary,
            "reported_network": "student",
            "noise_rate_actual": None,
            "seconds_per_epoch": 1.0,
            "model_dir": "run",
            "export_path": None,
        }
    )
    assert "best*" in text and "selected" in text
    assert "* best is test-selected" in text
    assert "student test accuracy at its best noisy held-out epoch (4): 15.00" in text


def test_summarise_with_fewer_than_10_epochs_and_no_held_out_split():
    summary = train.summarise(_history([0.2, 0.5, 0.3]), warmup_epochs=1)
    assert summary["joint"]["last10"] == pytest.approx(100.0 / 3)
    assert summary["student"]["last10"] == pytest.approx(50.0 / 3)
    assert "selected" not in summary["joint"] and "selection" not in summary


def test_noisy_validation_split_range_is_checked_before_loading_data():
    for bad in (-0.1, 1.0, 1.5):
        (problem,) = train.config_problems(
            train.TrainConfig(noisy_validation_split=bad)
        )
        assert f"--noisy_validation_split={bad} must be in [0, 1)" in problem
    # Holding out most of the set (for the calibration fit) is allowed; each
    # class keeping a training sample is checked once the labels are known.
    assert not train.config_problems(train.TrainConfig(noisy_validation_split=0.7))


def test_a_run_that_predates_the_flag_resumes_with_its_default(tmp_path):
    config = train.TrainConfig(model_dir=str(tmp_path))
    before = dataclasses.asdict(config)
    del before["noisy_validation_split"]
    (tmp_path / "config.json").write_text(json.dumps(before))
    assert train.resume_problems(config) == []
    changed = dataclasses.replace(config, noisy_validation_split=0.1)
    assert "--noisy_validation_split: 0.0 when" in train.resume_problems(changed)[0]


def test_a_split_leaving_a_class_without_held_out_samples_is_refused(tmp_path):
    # Class 1 has 2 of the 20 samples: round(0.2 * 2) = 0 of them held out.
    labels = np.array([0] * 18 + [1] * 2)
    flag = _npz(tmp_path / "data.npz", y_train=labels, class_names=np.array(["a", "b"]))
    config = tiny_run_config(
        tmp_path, flag.split("=", 1)[1], noise_type="none", noisy_validation_split=0.2
    )
    with pytest.raises(train.ConfigError, match=r"class 1 \('b'\): 2 noisy-labelled"):
        train.run(config)
    assert not (tmp_path / "run").exists()  # refused before the run started


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--noisy_validation_split=1"], "must be in [0, 1)"),
        # A split leaving a class empty, refused after loading the data: see
        # test_a_split_leaving_a_class_without_held_out_samples_is_refused.
    ],
    ids=["range"],
)
def test_bad_noisy_validation_split_exits_2_naming_the_flag(tmp_path, flags, named):
    result = _cli(*flags, f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--noisy_validation_split" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_noisy_held_out_split_selects_on_it(tmp_path):
    # In process (the CLI's start-up would double the time); the flag itself
    # reaches the config through absl as on the command line.
    from galkeras.training_set import noisy_holdout_split

    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--noisy_validation_split=0.2\n--batch_size=128\n")
    overrides = dataclasses.asdict(tiny_run_config(tmp_path, "digits"))
    for name in ("batch_size", "noisy_validation_split"):
        del overrides[name]
    config = train.config_from_flagfile(str(flagfile), **overrides)
    assert config.noisy_validation_split == 0.2
    text = train.format_summary(train.run(config))
    assert "selected" in text and "best is test-selected" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    labels = np.load(tmp_path / "run" / "labels.npz")
    noisy, heldout_ids = labels["noisy_labels"], labels["heldout_ids"]
    # Stratified by the noisy label, and the split a resumed run makes again.
    counts = np.bincount(noisy, minlength=10)
    held = np.bincount(noisy[heldout_ids], minlength=10)
    np.testing.assert_array_equal(held, [round(0.2 * n) for n in counts])
    np.testing.assert_array_equal(noisy_holdout_split(noisy, 0.2, 0)[1], heldout_ids)
    assert summary["heldout_examples"] == len(heldout_ids) == held.sum()
    assert summary["train_examples"] == len(noisy) - len(heldout_ids)
    for net in train.NETWORKS:
        assert {"best", "last", "last10", "selected"} <= set(summary[net])
    assert summary["selection"]["monitor"] == "heldout_student_accuracy"
    assert summary["selection"]["epoch"] in (1, 2)
    history = run_logging.read_history_csv(tmp_path / "run" / "history.csv")
    for net in train.NETWORKS:
        assert len(history[f"heldout_{net}_accuracy"]) == 2
    epoch = summary["selection"]["epoch"] - 1
    assert summary["selection"]["heldout_accuracy"] == pytest.approx(
        100 * history["heldout_student_accuracy"][epoch]
    )


def test_train_fit_logs_the_fit_of_the_set_trained_on_and_changes_nothing(tmp_path):
    import keras

    from galkeras.datasets import load_dataset

    def run(name, **flags):
        # `ce` takes GAL's --warmup_epochs default; 20% of the set is held out.
        values = dict(method="ce", warmup_epochs=12, batch_size=128)
        values.update(noisy_validation_split=0.2, **flags)
        return train.run(tiny_run_config(tmp_path / name, "digits", **values))

    summaries = [run("plain"), run("measured", train_fit=True)]
    histories, nets = [], []
    for name, summary in zip(("plain", "measured"), summaries):
        for key in ("seconds_per_epoch", "model_dir", "export_path", "keras_path"):
            summary.pop(key)
        summary["label_issues"].pop("path")  # in the run directory
        histories.append(
            run_logging.read_history_csv(tmp_path / name / "run" / "history.csv")
        )
        nets.append(keras.saving.load_model(tmp_path / name / "run" / "net.keras"))
    assert summaries[0] == summaries[1]
    for a, b in zip(nets[0].weights, nets[1].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    plain, measured = histories
    fit = {k: measured.pop(k) for k in list(measured) if k.startswith("train_")}
    assert plain == measured
    assert set(fit) == {"train_noisy_net_accuracy", "train_clean_net_accuracy"}
    # The last epoch's values, from the final network on the training images
    # that were trained on: the held-out ones are not among them.
    labels = np.load(tmp_path / "measured" / "run" / "labels.npz")
    trained = np.setdiff1d(
        np.arange(len(labels["noisy_labels"])), labels["heldout_ids"]
    )
    images = load_dataset("digits").x_train[trained]
    predicted = np.argmax(nets[1].predict(images, verbose=0), axis=-1)
    for kind in ("noisy", "clean"):
        expected = np.mean(predicted == labels[f"{kind}_labels"][trained])
        assert fit[f"train_{kind}_net_accuracy"][-1] == expected


# ------------------------------------------- faults found by trying to break it
@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"seed": -1}, "--seed=-1 must be an integer in [0, 2**32 - 1]"),
        ({"seed": 2**32}, f"--seed={2**32} must be an integer"),
        ({"noise_seed": -1}, "--noise_seed=-1 must be an integer"),
        ({"lr": float("inf")}, "--lr=inf must be a finite number"),
        ({"momentum": float("nan")}, "--momentum=nan must be a finite number"),
        ({"verbose": 3}, "--verbose=3 must be 0, 1 or 2"),
        ({"lr_decay_epochs": (1, 1)}, "--lr_decay_epochs=1,1 names an epoch twice"),
        ({"labels_csv": "x.csv"}, "--labels_csv does not apply to --dataset=digits"),
        ({"image_size": ("8", "8")}, "--image_size does not apply to --dataset=npz"),
    ],
    ids=[
        *("seed", "seed_2_32", "noise_seed", "lr", "momentum", "verbose"),
        *("decay_twice", "csv", "size"),
    ],
)
def test_flags_that_would_fail_later_are_refused_before_anything_is_written(
    tmp_path, overrides, named
):
    dataset = "npz:x.npz" if "image_size" in overrides else "digits"
    config = tiny_run_config(tmp_path, dataset, **overrides)
    assert any(named in p for p in train.config_problems(config))
    with pytest.raises(train.ConfigError, match=re.escape(named)):
        train.run(config)
    assert not (tmp_path / "run").exists()


def test_flags_of_one_source_are_accepted_there_and_refused_elsewhere():
    folder = train.TrainConfig(dataset="folder:x", image_size=("8", "8"))
    assert not train.dataset_flag_problems(folder)
    assert not train.dataset_flag_problems(
        dataclasses.replace(folder, dataset="clothing1m")
    )
    (problem,) = train.dataset_flag_problems(
        train.TrainConfig(dataset="clothing1m", labels_csv="x.csv")
    )
    assert problem == (
        "--labels_csv does not apply to --dataset=clothing1m (only to folder); "
        "remove it."
    )


def test_a_run_that_fails_before_training_accepts_a_corrected_retry(
    tmp_path, monkeypatch
):
    from galkeras import backbones

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backbones, "build_backbone", broken)
    config = tiny_run_config(tmp_path, "digits")
    with pytest.raises(RuntimeError, match="out of memory"):
        train.run(config)
    # No record of a run that never started: a retry with other flags is a new
    # run, not "a run started with other flags".
    assert not (tmp_path / "run" / "config.json").exists()
    assert not train.config_problems(dataclasses.replace(config, seed=1))


def test_unloadable_pretrained_weights_are_refused_naming_the_flag(tmp_path):
    garbage = tmp_path / "weights.h5"
    garbage.write_bytes(b"not an HDF5 file")
    rng = np.random.default_rng(0)
    flag = _npz(
        tmp_path / "data.npz",
        x_train=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
        x_test=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8),
    )
    config = tiny_run_config(
        tmp_path,
        flag.split("=", 1)[1],
        backbone="resnet50",
        backbone_width=0,
        pretrained_weights=str(garbage),
    )
    with pytest.raises(train.ConfigError, match=r"--pretrained_weights=.*weights\.h5"):
        train.run(config)
    assert os.listdir(tmp_path / "run") == []  # no record: a retry may differ


def test_new_run_never_writes_among_a_users_files(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,mine\n0,1\n")
    (run_dir / "labels.npz").write_bytes(b"the user's own labels")
    for new_run in (False, True):
        config = tiny_run_config(tmp_path, "digits", new_run=new_run)
        (problem,) = train.config_problems(config)
        assert "holds files but no galkeras run" in problem
        with pytest.raises(train.ConfigError, match="holds files but no galkeras"):
            train.run(config)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert sorted(os.listdir(run_dir)) == ["history.csv", "labels.npz"]
    assert (run_dir / "history.csv").read_text() == "epoch,mine\n0,1\n"
    assert (run_dir / "labels.npz").read_bytes() == b"the user's own labels"


def test_changed_data_is_refused_before_the_first_checkpoint_too(tmp_path):
    # A run that stopped before its first checkpoint: labels.npz is its record.
    config = tiny_run_config(tmp_path, "digits")
    noisy, none = np.arange(6) % 3, np.zeros(0, np.int64)
    (tmp_path / "run").mkdir()
    train.write_run_record(str(tmp_path / "run"), config, noisy, None, none)
    train.write_run_record(str(tmp_path / "run"), config, noisy, None, none)  # same
    for changed, named in [
        (np.arange(8) % 3, "6 examples when the run started, now 8"),
        (np.roll(noisy, 1), "other noisy labels for 6 of them"),
    ]:
        with pytest.raises(
            run_directory.RunRecordMismatch, match="training set changed"
        ) as error:
            train.write_run_record(str(tmp_path / "run"), config, changed, None, none)
        assert named in str(error.value)
    np.testing.assert_array_equal(
        np.load(tmp_path / "run" / "labels.npz")["noisy_labels"], noisy
    )


def test_new_directories_are_never_shared(tmp_path):
    (tmp_path / "run-20261202-101010").mkdir()
    (tmp_path / "run-20261202-101010-2").mkdir()
    assert train.unused_directory(str(tmp_path / "run-20261202-101010")) == str(
        tmp_path / "run-20261202-101010-3"
    )
    assert train.unused_directory(str(tmp_path / "new")) == str(tmp_path / "new")


def test_a_fault_of_a_new_run_names_the_command_that_resumes_it(
    tmp_path, monkeypatch, capsys
):
    old = tmp_path / "run"
    old.mkdir()
    config = tiny_run_config(tmp_path, "digits", new_run=True)
    (old / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    new_dir = str(tmp_path / "run-later")

    def preempted(config, *args):
        raise checkpointing.Preempted(os.path.join(new_dir, "checkpoints", "ckpt-4"))

    monkeypatch.setattr(train, "_train", preempted)
    prepared = train.Prepared(*[None] * 6, model_dir=new_dir, export_dir=None)
    monkeypatch.setattr(train, "_prepare", lambda *a: prepared)
    monkeypatch.setattr(train, "config_from_flags", lambda: config)
    monkeypatch.setattr(train, "config_problems", lambda config: [])
    with pytest.raises(SystemExit) as exit_:
        train.main(["galkeras.train"])
    assert exit_.value.code == checkpointing.PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert f"Re-run with --model_dir={new_dir} and without --new_run to resume" in err
    assert "same command" not in err
    # The named command resumes: the same flags, that directory, no --new_run.
    assert train.resume_command(config, new_dir) == f"--model_dir={new_dir}"
    same = dataclasses.replace(config, model_dir=new_dir, new_run=False)
    assert train.resume_command(same, new_dir) is None


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--epoch=3"], "Unknown command line flag 'epoch'"),
        (["--epochs=abc"], "flag --epochs=abc: invalid literal"),
        (["--flagfile=/no/such.flags"], "Unable to open flagfile"),
        (["--flagfile={typo}"], "Unknown command line flag 'epoch' (in the flag file"),
        (["stray"], "unexpected argument(s) 'stray'"),
    ],
    ids=["unknown", "type", "missing_flagfile", "flagfile_typo", "positional"],
)
def test_what_absl_refuses_exits_2_with_one_line(tmp_path, capsys, argv, named):
    from absl import flags

    typo = tmp_path / "typo.flags"
    typo.write_text("--epochs=3\n--epoch=4\n")
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    argv = ["galkeras.train", *(a.format(typo=typo) for a in argv)]
    with pytest.raises(SystemExit) as exit_:
        train.parse_command_line(argv, flag_values)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


def test_a_positional_argument_on_the_command_line_exits_2(tmp_path):
    result = _cli("--epochs=3", "stray", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("galkeras.train: error: unexpected argument(s) 'stray'")
    )
    assert "USAGE" not in result.stdout + result.stderr


def test_a_task_index_outside_the_cluster_is_named():
    cluster = {"worker": ["a:1", "b:2"]}
    problem = train.tf_config_problem(
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 2}})
    )
    assert "task is worker 2" in problem and "[0, 2)" in problem
    assert not train.tf_config_problem(
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    )


def test_a_ce_run_exports_its_trained_network(tmp_path):
    import keras
    import tensorflow as tf

    config = tiny_run_config(
        tmp_path, "digits", epochs=1, warmup_epochs=1, train_student=False
    )
    summary = train.run(config)
    assert summary["reported_network"] == "twin_a"
    assert summary["keras_path"].endswith("twin_a.keras")
    assert "exported θA" in train.format_summary(summary)
    from galkeras.datasets import load_dataset

    data = load_dataset("digits")
    served = tf.saved_model.load(summary["export_path"]).signatures["serving_default"]
    class_id = served(image=tf.constant(data.x_test))["class_id"].numpy()
    # The export's accuracy is θA's last test accuracy, not the untrained θC's.
    accuracy = 100 * np.mean(class_id == data.y_test)
    assert accuracy == pytest.approx(summary["twin_a"]["last"], abs=1e-3)
    twin_a = keras.saving.load_model(summary["keras_path"])
    np.testing.assert_array_equal(
        np.argmax(twin_a.predict(data.x_test, verbose=0), -1), class_id
    )


def test_the_joint_classifier_is_eq_6_as_logits(tiny):
    make, data = tiny
    gal = model.GAL(
        make("twin_a"), make("twin_b", seed=1), make("student"), warmup_epochs=1
    )
    images, _ = data(n=6)
    joint = gal.classifier("joint")
    za = gal.twin_a(images.astype("float32")).numpy()
    zb = gal.twin_b(images.astype("float32")).numpy()

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    out = joint(images.astype("float32")).numpy()
    np.testing.assert_allclose(
        softmax(out), 0.5 * (softmax(za) + softmax(zb)), atol=1e-6
    )
    assert gal.classifier("student") is gal.student


def test_a_student_starting_at_the_split_of_an_all_warm_up_run_is_untrained():
    split = train.TrainConfig(epochs=2, warmup_epochs=2, student_start="split")
    assert train.reported_network(split) == "twin_a"
    assert train.label_issue_network(split) == "twin_a"
    later = dataclasses.replace(split, warmup_epochs=1)
    assert train.reported_network(later) == "student"
    assert train.reported_network(dataclasses.replace(split, train_student=False)) == (
        "twin_a"
    )
    problems = train.config_problems(
        dataclasses.replace(split, label_issue_probabilities="student")
    )
    assert any("--student_start=split" in p for p in problems)
