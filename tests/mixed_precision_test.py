"""Mixed precision: bfloat16 trains; float16 scales the loss and skips a step with
a non-finite gradient for both twins, leaving weights and slots bit-identical."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data, tiny_net

from galkeras import optimizers
from galkeras.model import GAL
from galkeras.training_set import TrainingSet


@pytest.fixture
def policy():
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)

    yield set_policy
    keras.mixed_precision.set_global_policy("float32")


def _gal(**kwargs):
    gal = GAL(tiny_net("twin_a"), tiny_net("twin_b"), tiny_net("student"), **kwargs)
    gal.compile(optimizer=optimizers.SGD(0.05, momentum=0.9))
    return gal


def test_bfloat16_trains_with_float32_agreement(policy):
    policy("mixed_bfloat16")
    images, labels = tiny_data(48)
    gal = _gal(warmup_epochs=1)
    assert gal.twin_a.layers[2].compute_dtype == "bfloat16"
    assert not gal.loss_scaling
    history = gal.fit(
        TrainingSet(images, labels, batch_size=8),
        epochs=3,
        validation_data=(images, labels),
        verbose=0,
    ).history
    assert all(np.isfinite(history["twin_a_loss"]))
    assert gal.last_step["agreement_per_variable"].dtype == tf.float32
    assert history["val_student_accuracy"][-1] > 0.5


def _snapshot(gal):
    # Trainable weights and optimizer slots only: BatchNorm's moving statistics
    # update in the forward pass whatever the gradients do, skipped step or not.
    nets = [
        v.numpy().copy()
        for n in (gal.twin_a, gal.twin_b)
        for v in n.trainable_variables
    ]
    slots = [
        v.numpy().copy()
        for opt in (gal.optimizer, gal.optimizer_b)
        for v in opt.variables
        if "iteration" not in v.path
    ]
    return nets, slots


def _batch(images, labels, nan_in_b=False):
    image_b = images[8:16].astype(np.float32)
    if nan_in_b:
        image_b = image_b.copy()
        image_b[0, 0, 0, 0] = np.nan
    return {
        "image_a": images[:8].astype(np.float32),
        "label_a": labels[:8].astype(np.int32),
        "id_a": np.arange(8),
        "image_b": image_b,
        "label_b": labels[8:16].astype(np.int32),
        "id_b": np.arange(8, 16),
    }


@pytest.mark.parametrize("masked_update", ["skip", "zero_grad"])
def test_float16_non_finite_step_is_skipped_for_both_twins(policy, masked_update):
    policy("mixed_float16")
    images, labels = tiny_data(48)
    gal = _gal(
        warmup_epochs=1, tau=-1.0, masked_update=masked_update, train_student=False
    )
    assert gal.loss_scaling
    gal.enter_epoch(1)  # agreement phase, θB := θA
    step = gal.train_function

    def run(batch):
        step(iter(tf.data.Dataset.from_tensors(batch)))

    run(_batch(images, labels))  # a good step builds slots
    before = _snapshot(gal)
    # A scale this large overflows the scaled loss: every gradient is non-finite,
    # as when float16 gradients overflow.
    gal.twins_loss_scale.value.assign(3e38)
    run(_batch(images, labels))
    after = _snapshot(gal)
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        np.testing.assert_array_equal(a, b)  # θA too: both twins skip
    assert float(gal.twins_loss_scale.value.numpy()) == np.float32(3e38) / 2
    assert int(gal.twins_loss_scale.skipped_steps.numpy()) == 1
    gal.twins_loss_scale.value.assign(1024.0)
    run(_batch(images, labels))  # and training goes on
    moved = _snapshot(gal)
    assert any(not np.array_equal(a, b) for a, b in zip(after[0], moved[0]))
    assert all(np.all(np.isfinite(w)) for w in moved[0] + moved[1])


def test_float16_loss_scale_grows_after_finite_steps(policy):
    policy("mixed_float16")
    gal = _gal(warmup_epochs=0, train_student=False)
    scale = gal.twins_loss_scale
    scale.growth_steps = 2
    start = float(scale.value.numpy())
    for _ in range(2):
        scale.update(tf.constant(True))
    assert float(scale.value.numpy()) == 2 * start
    scale.update(tf.constant(False))
    assert float(scale.value.numpy()) == start


def test_float16_one_twins_non_finite_gradient_skips_both(policy):
    policy("mixed_float16")
    images, labels = tiny_data(48)
    # Element gates ("same sign"): the float16 gradients' signs, in float32.
    gal = _gal(
        warmup_epochs=1, tau=0.5, train_student=False, agreement_granularity="element"
    )
    gal.enter_epoch(1)
    initial = _snapshot(gal)

    def run(batch):
        gal.train_function(iter(tf.data.Dataset.from_tensors(batch)))

    run(_batch(images, labels))
    before = _snapshot(gal)
    assert all(np.all(np.isfinite(w)) for w in before[0] + before[1])
    assert any(not np.array_equal(a, b) for a, b in zip(initial[0], before[0]))
    assert 0 < float(gal.last_step["agreement_param_ratio"].numpy()) < 1
    run(_batch(images, labels, nan_in_b=True))  # θA's gradient is finite
    for a, b in zip(before[0] + before[1], _snapshot(gal)[0] + _snapshot(gal)[1]):
        np.testing.assert_array_equal(a, b)
    assert int(gal.twins_loss_scale.skipped_steps.numpy()) == 1
