"""GatedUpdate: `skip` and `zero_grad` at channel and element granularity against
NumPy re-implementations of the optimizers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from galkeras import optimizers
from galkeras.gated_update import DynamicLossScale, GatedUpdate

LR, MOMENTUM, WD = 0.1, 0.9, 0.05
SHAPES = {"kernel": (2, 2, 1, 3), "bias": (3,)}


class _NoModel:
    """`DynamicLossScale` without float16 makes no variable, so needs no model."""


def _setup(make_optimizer, masked_update="skip"):
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.normal(size=s).astype(np.float32), name=name)
        for name, s in SHAPES.items()
    ]
    optimizer = make_optimizer()
    optimizer.build(variables)
    scale = DynamicLossScale(_NoModel(), "twins", enabled=False)
    update = GatedUpdate(optimizer, variables, scale, masked_update)
    # One ungated step first, so that every slot holds non-zero values.
    update.apply([rng.normal(size=s).astype(np.float32) for s in SHAPES.values()])
    grads = [rng.normal(size=s).astype(np.float32) for s in SHAPES.values()]
    return update, grads


def _gates(granularity):
    if granularity == "channel":
        # Per output channel: [C] for the kernel, [C] for the bias.
        return [np.array([True, False, True]), np.array([False, True, True])]
    rng = np.random.default_rng(1)
    return [rng.random(s) < 0.5 for s in SHAPES.values()]


def _state(update):
    return [
        (v.numpy().copy(), [s.numpy().copy() for s in slots])
        for v, slots in zip(update.variables, update.slots)
    ]


def _sgd(theta, buf, g):
    """PyTorch's SGD step, coupled weight decay, dampening 0."""
    buf = MOMENTUM * buf + (g + WD * theta)
    return theta - LR * buf, [buf]


def _adam(theta, m, v, g, t):
    """Keras' Adam step number `t` (1-based)."""
    b1, b2, eps = 0.9, 0.999, 1e-7
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    alpha = LR * np.sqrt(1 - b2**t) / (1 - b1**t)
    return theta - alpha * m / (np.sqrt(v) + eps), [m, v]


OPTIMIZERS = {
    "sgd_momentum_wd": (
        lambda: optimizers.SGD(LR, momentum=MOMENTUM, weight_decay=WD),
        lambda theta, slots, g: _sgd(theta, slots[0], g),
    ),
    "adam": (
        lambda: keras.optimizers.Adam(LR),
        lambda theta, slots, g: _adam(theta, *slots, g, t=2),
    ),
}


@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_keeps_closed_elements_and_slots_and_steps_open_ones(granularity, name):
    make_optimizer, reference = OPTIMIZERS[name]
    update, grads = _setup(make_optimizer)
    gates = _gates(granularity)
    before = _state(update)
    tf.function(update.apply)(grads, [tf.constant(g) for g in gates])
    after = _state(update)
    assert int(update.optimizer.iterations.numpy()) == 2
    for (theta0, slots0), (theta1, slots1), g, gate in zip(before, after, grads, gates):
        open_ = np.broadcast_to(gate, theta0.shape)
        want_theta, want_slots = reference(
            theta0.astype(np.float64), [s.astype(np.float64) for s in slots0], g
        )
        for old, new, want in zip(
            [theta0, *slots0], [theta1, *slots1], [want_theta, *want_slots]
        ):
            np.testing.assert_array_equal(new[~open_], old[~open_])  # bit-identical
            np.testing.assert_allclose(new[open_], want[open_], rtol=1e-5, atol=1e-7)


def test_zero_grad_at_element_granularity_steps_on_the_masked_gradient():
    make_optimizer, reference = OPTIMIZERS["sgd_momentum_wd"]
    update, grads = _setup(make_optimizer, masked_update="zero_grad")
    gates = _gates("element")
    before = _state(update)
    tf.function(update.apply)(grads, [tf.constant(g) for g in gates])
    for (theta0, slots0), (theta1, slots1), g, gate in zip(
        before, _state(update), grads, gates
    ):
        want_theta, want_slots = reference(
            theta0.astype(np.float64), [slots0[0].astype(np.float64)], g * gate
        )
        # Every element moves: momentum and weight decay act on closed ones too.
        np.testing.assert_allclose(theta1, want_theta, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(slots1[0], want_slots[0], rtol=1e-5, atol=1e-7)


def test_a_step_that_is_not_ok_moves_nothing_not_even_the_counter():
    update, grads = _setup(OPTIMIZERS["sgd_momentum_wd"][0])
    before = _state(update)
    grads[0][0, 0, 0, 0] = np.nan
    tf.function(update.apply)(
        grads, [tf.constant(g) for g in _gates("element")], step_ok=tf.constant(False)
    )
    for (theta0, slots0), (theta1, slots1) in zip(before, _state(update)):
        for old, new in zip([theta0, *slots0], [theta1, *slots1]):
            np.testing.assert_array_equal(new, old)
    assert int(update.optimizer.iterations.numpy()) == 1
