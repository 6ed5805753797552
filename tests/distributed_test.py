"""Two replicas (two logical CPUs) train exactly as one device does."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data

from galkeras import optimizers
from galkeras.model import GAL
from galkeras.training_set import TrainingSet


def _net(name):
    # No BatchNorm: per-replica batch statistics would differ by design.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name=name)


def _train(strategy, tau):
    with strategy.scope():
        gal = GAL(
            _net("twin_a"), _net("twin_b"), _net("student"), warmup_epochs=1, tau=tau
        )
        gal.compile(optimizer=optimizers.SGD(0.1, momentum=0.9))
    images, labels = tiny_data(32)
    gal.fit(
        TrainingSet(images, labels, batch_size=8),
        epochs=3,
        validation_data=(images, labels),
        verbose=0,
    )
    return gal


@pytest.mark.parametrize("tau", [0.4, -1.0])
def test_two_replicas_match_one_device(tau):
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs that conftest configures")
    one = _train(tf.distribute.OneDeviceStrategy("/cpu:0"), tau)
    two = _train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), tau)
    assert two.distribute_strategy.num_replicas_in_sync == 2
    for key in ("agreement_ratio", "val_twin_b_accuracy", "val_student_accuracy"):
        np.testing.assert_allclose(one.history.history[key], two.history.history[key])
    for net in ("twin_a", "twin_b", "student"):
        for a, b in zip(
            getattr(one, net).get_weights(), getattr(two, net).get_weights()
        ):
            np.testing.assert_allclose(a, b, atol=1e-5)
    for opt in ("optimizer", "optimizer_b"):
        for a, b in zip(getattr(one, opt).variables, getattr(two, opt).variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
