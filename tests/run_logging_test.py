"""Run logs: per-step values are the step's own, reach steps.csv and TensorBoard,
the test split is evaluated beside a validation split, and the training-set fit
is each network's accuracy and leaves training as it was."""

import csv
import glob

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data, tiny_net

from galkeras import GAL, TrainingSet, methods, run_logging, sampling
from galkeras.run_logging import EvaluateTestSplit, RunLogger


def _gal(**kwargs):
    gal = GAL(tiny_net("twin_a"), tiny_net("twin_b"), tiny_net("student"), **kwargs)
    gal.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return gal


def _tensorboard_scalars(log_dir):
    values = {}
    for path in glob.glob(f"{log_dir}/train/events*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                number = float(tf.make_ndarray(value.tensor))
                values.setdefault(value.tag, {})[event.step] = number
    return values


def test_steps_csv_and_tensorboard_hold_each_logged_step(tmp_path):
    images, labels = tiny_data(48)
    # τ = 1 with independent random batches: no pair ever agrees after warm-up.
    gal = _gal(warmup_epochs=1, tau=1.0)
    training_set = TrainingSet(images, labels, batch_size=8, sampling="random")
    logger = RunLogger(gal, str(tmp_path / "tb"), str(tmp_path / "steps.csv"), 4)
    gal.fit(
        training_set,
        epochs=2,
        validation_data=(images, labels),
        callbacks=[logger],
        verbose=0,
    )
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    # 6 steps per epoch, 12 in all: steps 4, 8 and 12 are logged.
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert [r["phase"] for r in rows] == ["warmup", "agreement", "agreement"]
    assert float(rows[0]["agreement_ratio"]) == 1.0  # identical batches in warm-up
    assert [float(r["agreement_ratio"]) for r in rows[1:]] == [0.0, 0.0]
    assert [float(r["updated_ratio"]) for r in rows[1:]] == [0.0, 0.0]
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert scalars["step/agreement_ratio"] == {4: 1.0, 8: 0.0, 12: 0.0}
    assert set(scalars["epoch/val_student_accuracy"]) == {1, 2}
    np.testing.assert_allclose(
        scalars["step/twin_a_loss"][12], float(rows[2]["twin_a_loss"]), rtol=1e-5
    )


def test_last_step_values_are_the_steps_own_not_epoch_means():
    images, labels = tiny_data(16)
    gal = _gal(warmup_epochs=0)
    # One step per epoch: the epoch mean is that step's value.
    training_set = TrainingSet(images, labels, batch_size=16)
    history = gal.fit(training_set, epochs=3, verbose=0).history
    for key in ("twin_a_loss", "twin_b_loss", "agreement_ratio", "updated_ratio"):
        np.testing.assert_allclose(
            gal.last_step[key].numpy(), history[key][-1], rtol=1e-6
        )
    np.testing.assert_allclose(
        gal.last_step["student_loss"].numpy(), history["loss"][-1], rtol=1e-6
    )
    cosines = gal.last_step["agreement_per_variable"].numpy()
    assert cosines.shape == (len(gal.twin_a.trainable_variables),)
    np.testing.assert_allclose(
        np.mean(cosines >= gal.tau), history["agreement_ratio"][-1]
    )


def test_test_evaluator_adds_test_accuracies_beside_validation():
    images, labels = tiny_data(24)
    gal = _gal(warmup_epochs=1)
    test = sampling.evaluation_dataset(images[:12], labels[:12], batch_size=5)
    history = gal.fit(
        TrainingSet(images, labels, batch_size=8),
        epochs=2,
        validation_data=(images[12:], labels[12:]),
        callbacks=[EvaluateTestSplit(gal, test)],
        verbose=0,
    ).history
    expected = gal.evaluate(test, verbose=0, return_dict=True)
    for net in ("twin_a", "twin_b", "joint", "student"):
        assert len(history[f"test_{net}_accuracy"]) == 2
        assert history[f"test_{net}_accuracy"][-1] == expected[f"{net}_accuracy"]
        assert f"val_{net}_accuracy" in history


def test_truncate_logs_drops_the_rows_a_resumed_run_writes_again(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss\n0,1.0\n1,0.5\n2,0.25\n")
    (tmp_path / "steps.csv").write_text(
        "step,epoch,phase\n" + "".join(f"{s},{(s - 1) // 4},x\n" for s in range(1, 11))
    )
    # 6 steps done, 4 per epoch: epoch 1 is re-run from its third step.
    run_logging.truncate_logs(str(tmp_path), start_step=6, steps_per_epoch=4)
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,loss",
        "0,1.0",
    ]
    steps = (tmp_path / "steps.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in steps] == [1, 2, 3, 4, 5, 6]
    # Died before the first checkpoint: every row goes.
    run_logging.truncate_logs(str(tmp_path), start_step=0, steps_per_epoch=4)
    assert (tmp_path / "history.csv").read_text().splitlines() == ["epoch,loss"]
    history = run_logging.read_history_csv(str(tmp_path / "history.csv"))
    assert history == {}


# ------------------------------------------------------- training-set fit
def _noisy_training_set():
    images, clean = tiny_data(30)
    noisy = clean.copy()
    noisy[::4] = (noisy[::4] + 1) % 3  # a quarter of the labels flipped
    return TrainingSet(images, noisy, batch_size=8, clean_labels=clean)


def _method(kind):
    if kind == "gal":
        # τ = -1: every gate opens, so θB moves on its own batches after W.
        return _gal(warmup_epochs=1, tau=-1.0)
    method = methods.CoTeaching(tiny_net("net1"), tiny_net("net2", seed=1), 0.25)
    method.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return method


class _Softmaxes(keras.callbacks.Callback):
    """Each network's softmax on `images` at every epoch end, in inference mode."""

    def __init__(self, networks, images):
        super().__init__()
        self.networks, self.images, self.epochs = networks, images, []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(
            {
                name: tf.nn.softmax(net(self.images, training=False)).numpy()
                for name, net in self.networks.items()
            }
        )


def _fit_recording_softmaxes(kind, measure):
    """`(method, history, softmaxes, EvaluateTrainingFit)` of two epochs on the
    noisy tiny set, measured or not."""
    training_set = _noisy_training_set()
    method = _method(kind)
    if kind == "gal":
        networks = {n: getattr(method, n) for n in ("twin_a", "twin_b", "student")}
    else:
        networks = method.networks
    softmaxes = _Softmaxes(networks, training_set.images.astype("float32"))
    fit = run_logging.EvaluateTrainingFit(method, training_set)
    history = method.fit(
        training_set,
        epochs=2,
        callbacks=[fit, softmaxes] if measure else [softmaxes],
        verbose=0,
    ).history
    return method, history, softmaxes, fit


def _state(method):
    """Every variable of the run, and the global random generators' states."""
    variables = [v.numpy() for vs in method.run_state().values() for v in vs]
    rngs = [np.random.get_state()[1], tf.random.get_global_generator().state]
    return variables + [np.asarray(r) for r in rngs]


@pytest.mark.parametrize("kind", ["gal", "coteaching"])
def test_training_fit_is_each_networks_accuracy_and_changes_nothing(kind):
    pair = ("twin_a", "twin_b") if kind == "gal" else ("net1", "net2")
    unmeasured, _, _, _ = _fit_recording_softmaxes(kind, measure=False)
    method, history, softmaxes, fit = _fit_recording_softmaxes(kind, measure=True)
    training_set = _noisy_training_set()
    for epoch, probabilities in enumerate(softmaxes.epochs):
        if kind == "gal" and epoch == 0:
            # θB stands for θA until the twins split at W = 1 (GAL's evaluation).
            probabilities["twin_b"] = probabilities["twin_a"]
        probabilities["joint"] = (probabilities[pair[0]] + probabilities[pair[1]]) / 2
        for name, p in probabilities.items():
            for labels, kind_of in (
                (training_set.labels, "noisy"),
                (training_set.clean_labels, "clean"),
            ):
                logged = history[f"train_{kind_of}_{name}_accuracy"][epoch]
                expected = np.mean(p.argmax(axis=1) == labels)
                assert logged == expected, (name, kind_of, epoch)
    measured = {k for k in history if k.startswith(("train_noisy_", "train_clean_"))}
    measured.discard("train_clean_accuracy")  # GAL's refresh statistic
    assert measured == {
        f"train_{k}_{n}_accuracy" for k in ("noisy", "clean") for n in probabilities
    }
    # Measuring changed no weight, statistic or optimizer slot, and drew no
    # random number: the runs with and without it end bit for bit alike.
    before = _state(method)
    for a, b in zip(_state(unmeasured), before, strict=True):
        np.testing.assert_array_equal(a, b)
    fit.on_epoch_end(2, {})
    for a, b in zip(before, _state(method), strict=True):
        np.testing.assert_array_equal(a, b)
