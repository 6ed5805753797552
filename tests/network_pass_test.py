"""`NetworkPass`: a network's forward and backward pass as one pure function,
the same with and without XLA, and a clear refusal when XLA cannot compile it."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data, tiny_net, tiny_run_config

from galkeras import train
from galkeras.network_pass import NetworkPass, resolve_jit_compile


def _mean_ce(logits, inputs):
    loss = keras.losses.sparse_categorical_crossentropy(
        inputs["labels"], logits["net"], from_logits=True
    )
    return {"net": tf.reduce_mean(loss)}, None


@pytest.mark.parametrize("jit_compile", [False, True])
def test_pass_gives_the_loss_gradients_and_batchnorm_state_of_a_plain_tape(
    jit_compile,
):
    images, labels = tiny_data(n=12)
    images = tf.constant(images, tf.float32)
    reference, net = tiny_net("net"), tiny_net("net")  # same seed: same weights
    with tf.GradientTape() as tape:
        logits = reference(images, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
        )
        scaled = loss * 0.5
    want = tape.gradient(scaled, reference.trainable_variables)

    network_pass = NetworkPass({"net": net}, _mean_ce, jit_compile)
    losses, extras, grads, _ = network_pass({"labels": labels}, {"net": images}, 0.5)
    assert extras is None
    np.testing.assert_allclose(losses["net"].numpy(), loss.numpy(), rtol=1e-6)
    for g, w in zip(grads["net"], want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    # The BatchNorm statistics moved as a training call moves them.
    for v, w in zip(net.non_trainable_variables, reference.non_trainable_variables):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-6)
    assert not np.allclose(
        net.non_trainable_variables[0].numpy(),
        tiny_net("fresh").non_trainable_variables[0].numpy(),
    )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_uint8_batches_are_cast_in_the_pass(jit_compile):
    images, labels = tiny_data(n=12)  # uint8, as the pipelines deliver them
    outputs = []
    for batch in (tf.constant(images), tf.constant(images, tf.float32)):
        net = tiny_net("net")
        network_pass = NetworkPass({"net": net}, _mean_ce, jit_compile)
        losses, _, grads, _ = network_pass({"labels": labels}, {"net": batch})
        outputs.append([losses["net"].numpy()] + [g.numpy() for g in grads["net"]])
    for got, want in zip(*outputs):
        np.testing.assert_array_equal(got, want)


def test_jit_compile_auto_is_xla_on_a_gpu_and_the_whole_step_only_without_strategy():
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert resolve_jit_compile("auto", None) == (on_gpu, on_gpu)
    assert resolve_jit_compile(True, None) == (True, True)
    assert resolve_jit_compile(True, object()) == (False, True)
    assert resolve_jit_compile(False, None) == (False, False)
    with pytest.raises(ValueError, match="jit_compile='yes'"):
        resolve_jit_compile("yes", None)


class _HostOp(keras.layers.Layer):
    """An identity through `tf.numpy_function`, which XLA cannot compile."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a, [x], tf.float32)
        return tf.ensure_shape(y, x.shape)


def test_jit_compile_true_refuses_a_network_xla_cannot_compile(tmp_path, monkeypatch):
    from galkeras import backbones

    build = backbones.build_backbone

    def with_host_op(*args, **kwargs):
        net = build(*args, **kwargs)
        inputs = keras.Input(net.input_shape[1:])
        outputs = net(_HostOp()(keras.layers.Rescaling(1.0)(inputs)))
        return keras.Model(inputs, outputs, name=net.name)

    monkeypatch.setattr(backbones, "build_backbone", with_host_op)
    np.savez(
        tmp_path / "data.npz",
        x_train=np.zeros((20, 6, 6), np.uint8),
        y_train=np.arange(20) % 2,
        x_test=np.zeros((4, 6, 6), np.uint8),
        y_test=np.arange(4) % 2,
    )
    config = tiny_run_config(
        tmp_path, f"npz:{tmp_path / 'data.npz'}", jit_compile="true"
    )
    with pytest.raises(train.ConfigError) as refused:
        train.run(config)
    message = str(refused.value)
    assert "--jit_compile=true" in message and "XLA cannot compile" in message
    assert "twin_a" in message and "--jit_compile=false" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training
