"""Two replicas (two logical CPUs) train exactly as one device does."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data

from galkeras import optimizers
from galkeras.model import GAL
from galkeras.training_set import TrainingSet

_MIRRORED = []


def _mirrored():
    """One MirroredStrategy for the whole module: TensorFlow's collective keys can
    collide between several MirroredStrategy objects in one process, and a
    program uses one strategy anyway."""
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]


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
    two = _train(_mirrored(), tau)
    assert two.distribute_strategy.num_replicas_in_sync == 2
    for key in ("agreement_ratio", "val_twin_b_accuracy", "val_student_accuracy"):
        np.testing.assert_allclose(one.history.history[key], two.history.history[key])
    for net in ("twin_a", "twin_b", "student"):
        for a, b in zip(
            getattr(one, net).get_weights(), getattr(two, net).get_weights()
        ):
            np.testing.assert_allclose(a, b, atol=1e-5)
    for opt in ("optimizer", "optimizer_b", "student_optimizer"):
        for a, b in zip(getattr(one, opt).variables, getattr(two, opt).variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    # The same gates, step by step, and the same pseudo-label table.
    np.testing.assert_allclose(
        one.variable_open_fraction.result(), two.variable_open_fraction.result()
    )
    np.testing.assert_allclose(
        one.last_step["agreement_per_variable"].numpy(),
        two.last_step["agreement_per_variable"].numpy(),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        one.pseudo_labels.numpy(), two.pseudo_labels.numpy(), atol=1e-6
    )


def test_element_granularity_on_two_replicas_matches_one_device():
    """Gates from the global gradients: two agreement steps, the same weights."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs that conftest configures")
    images, labels = tiny_data(16)
    results = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), _mirrored()):
        with strategy.scope():
            gal = GAL(
                _net("twin_a"),
                _net("twin_b"),
                _net("student"),
                warmup_epochs=0,
                train_student=False,
                agreement_granularity="element",
            )
            gal.compile(optimizer=optimizers.SGD(0.1, momentum=0.9))
        gal.fit(TrainingSet(images, labels, batch_size=8), epochs=1, verbose=0)
        results.append(gal)
    one, two = results
    assert 0 < float(two.last_step["agreement_param_ratio"].numpy()) < 1
    for key in ("agreement_param_ratio", "agreement_per_variable"):
        np.testing.assert_allclose(
            one.last_step[key].numpy(), two.last_step[key].numpy(), atol=1e-6
        )
    for net in ("twin_a", "twin_b"):
        for a, b in zip(
            getattr(one, net).get_weights(), getattr(two, net).get_weights()
        ):
            np.testing.assert_allclose(a, b, atol=1e-5)


def _pair(strategy, tau):
    with strategy.scope():
        gal = GAL(
            _net("twin_a"), _net("twin_b"), _net("student"), warmup_epochs=1, tau=tau
        )
        gal.compile(optimizer=optimizers.SGD(0.1, momentum=0.9))
    return gal


def test_refresh_is_spread_over_replicas_and_gives_the_one_device_table():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs that conftest configures")
    images, labels = tiny_data(32)
    tables = []
    for strategy in (
        tf.distribute.OneDeviceStrategy("/cpu:0"),
        _mirrored(),
    ):
        gal = _pair(strategy, 0.4)
        # Batches of 7: the last holds 4, and a batch of 7 splits 4 + 3.
        gal.refresh_pseudo_labels(TrainingSet(images, labels, 8), batch_size=7)
        tables.append(gal.pseudo_labels.numpy())
    np.testing.assert_allclose(tables[0], tables[1], atol=1e-6)
    assert np.all(tables[1].sum(axis=1) > 0.99)  # every row filled


def _linear(name):
    # logits = x @ W with W = 0: the CE gradient of one example is x ⊗ (p − e_y).
    inputs = keras.Input((1, 2, 1), name="image")
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(2, use_bias=False, kernel_initializer="zeros")(x)
    return keras.Model(inputs, outputs, name=name)


def test_gates_use_global_gradients_not_per_replica_ones():
    """Per replica the twins' gradients are orthogonal (cosine 0); their means
    over the two replicas are equal (cosine 1). With τ = 0.9 the gate opens only
    if the cosine is taken on the global gradients."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs that conftest configures")
    strategy = _mirrored()
    with strategy.scope():
        gal = GAL(
            _linear("twin_a"),
            _linear("twin_b"),
            _linear("student"),
            warmup_epochs=1,
            tau=0.9,
            train_student=False,
        )
        gal.compile(optimizer=optimizers.SGD(0.1))
    gal.enter_epoch(1)  # θB := θA, agreement phase
    e0, e1 = [[[1.0], [0.0]]], [[[0.0], [1.0]]]
    # Replica 0: θA sees e0, θB sees e1; replica 1 the reverse. Labels all 0.
    batch = {
        "image_a": np.array([e0, e1], np.float32),
        "image_b": np.array([e1, e0], np.float32),
        "label_a": np.zeros(2, np.int32),
        "label_b": np.zeros(2, np.int32),
        "id_a": np.array([0, 1]),
        "id_b": np.array([2, 3]),
    }
    dataset = tf.data.Dataset.from_tensors(batch)
    gal.train_function(iter(strategy.experimental_distribute_dataset(dataset)))
    assert float(gal.last_step["agreement_ratio"].numpy()) == 1.0
    kernel_a = gal.twin_a.trainable_variables[0].numpy()
    # The update is the global gradient's step: −0.1 · mean over replicas.
    np.testing.assert_allclose(kernel_a, [[0.025, -0.025], [0.025, -0.025]], atol=1e-7)
    np.testing.assert_allclose(kernel_a, gal.twin_b.trainable_variables[0].numpy())


def test_sync_batchnorm_normalises_with_the_global_batch_statistics():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs that conftest configures")
    from galkeras.backbones import synchronize_batchnorm

    strategy = _mirrored()
    with strategy.scope():
        inputs = keras.Input((1,), name="image")
        outputs = keras.layers.BatchNormalization(center=False, scale=False)(inputs)
        local = keras.Model(inputs, outputs)
        synced = synchronize_batchnorm(local)
    # Replica 0 sees [0, 0], replica 1 sees [2, 2]: local means 0 and 2, global 1.
    batch = tf.data.Dataset.from_tensors(np.array([[0.0], [0.0], [2.0], [2.0]]))

    def replica_outputs(model):
        step = tf.function(lambda x: model(x, training=True))
        x = next(iter(strategy.experimental_distribute_dataset(batch)))
        return [
            t.numpy()
            for t in strategy.experimental_local_results(strategy.run(step, (x,)))
        ]

    assert all(np.allclose(out, 0.0) for out in replica_outputs(local))
    first, second = replica_outputs(synced)
    np.testing.assert_allclose(first, -1.0, atol=1e-3)  # (0 − 1) / 1
    np.testing.assert_allclose(second, 1.0, atol=1e-3)


@pytest.mark.parametrize("method", ["gal", "jocor"])
def test_compiled_passes_on_two_replicas_match_uncompiled(method):
    # XLA under MirroredStrategy: each replica's forward and backward pass is
    # one compiled function; the result is the uncompiled run's.
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs that conftest configures")
    from conftest import tiny_net

    from galkeras import methods

    def train(jit_compile):
        with _mirrored().scope():
            if method == "gal":
                model = GAL(
                    tiny_net("twin_a"),
                    tiny_net("twin_b"),
                    tiny_net("student", seed=1),
                    warmup_epochs=1,
                    tau=0.0,
                )
            else:
                model = methods.JoCoR(tiny_net("a"), tiny_net("b", seed=1), 0.2)
            model.compile(
                optimizer=optimizers.SGD(0.1, momentum=0.9), jit_compile=jit_compile
            )
        images, labels = tiny_data(32)
        model.fit(
            TrainingSet(images, labels, batch_size=8),
            epochs=2,
            validation_data=(images, labels),
            verbose=0,
        )
        return model

    compiled, plain = train(True), train(False)
    passes = list(compiled._passes.values()) if method == "gal" else [compiled._pass]
    assert len(passes) == (3 if method == "gal" else 1)
    for network_pass in passes:
        assert network_pass.jit_compile
        assert network_pass._function.experimental_get_tracing_count() >= 1
    assert not compiled.jit_compile  # no whole-step XLA under a strategy
    for a, b in zip(compiled.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Evaluation (and GAL's refresh) ran each network's compiled forward pass.
    assert compiled._infer.jit_compile and compiled._infer._functions
    for key, values in plain.history.history.items():
        np.testing.assert_allclose(compiled.history.history[key], values, atol=1e-6)
