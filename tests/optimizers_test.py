import keras
import numpy as np
import pytest

from galkeras import optimizers


def _torch_sgd_reference(theta, grads, lrs, momentum, wd):
    """PyTorch's SGD(momentum, weight_decay), dampening 0, written in NumPy."""
    theta = theta.astype(np.float64).copy()
    buf = None
    for g, lr in zip(grads, lrs):
        d = g + wd * theta
        buf = d if buf is None else momentum * buf + d
        theta = theta - lr * buf
    return theta


def test_coupled_sgd_matches_pytorch_rule():
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    var = keras.Variable(theta0)
    opt = optimizers.SGD(0.1, momentum=0.9, weight_decay=0.05)
    for g in grads:
        opt.apply([g], [var])
    want = _torch_sgd_reference(theta0, grads, [0.1] * 4, 0.9, 0.05)
    np.testing.assert_allclose(var.numpy(), want, rtol=1e-5)


def test_decoupled_decay_is_outside_momentum():
    theta0 = np.array([1.0, -2.0], np.float32)
    var = keras.Variable(theta0)
    opt = optimizers.SGD(
        0.1, momentum=0.9, weight_decay=0.5, weight_decay_mode="decoupled"
    )
    opt.apply([np.zeros(2, np.float32)], [var])
    # Zero gradient: only the decoupled decay acts, theta <- theta - lr*wd*theta.
    np.testing.assert_allclose(var.numpy(), theta0 * (1 - 0.1 * 0.5), rtol=1e-6)


def test_schedule_drops_exactly_at_the_epoch_boundary():
    schedule = optimizers.piecewise_epoch_schedule(0.06, [2, 3], 0.1, steps_per_epoch=5)
    lrs = [float(schedule(s)) for s in range(16)]
    np.testing.assert_allclose(lrs[:10], [0.06] * 10, rtol=1e-6)
    np.testing.assert_allclose(lrs[10:15], [0.006] * 5, rtol=1e-6)
    np.testing.assert_allclose(lrs[15], 0.0006, rtol=1e-6)


def test_schedule_reaches_the_optimizer_step_by_step():
    schedule = optimizers.piecewise_epoch_schedule(1.0, [1], 0.1, steps_per_epoch=2)
    var = keras.Variable(np.zeros(1, np.float32))
    opt = optimizers.SGD(schedule, momentum=0.0, weight_decay=0.0)
    moves = []
    for _ in range(4):
        before = var.numpy().copy()
        opt.apply([np.ones(1, np.float32)], [var])
        moves.append(float(before[0] - var.numpy()[0]))
    np.testing.assert_allclose(moves, [1.0, 1.0, 0.1, 0.1], rtol=1e-6)


def test_config_round_trip_and_bad_mode():
    opt = optimizers.SGD(
        0.2, momentum=0.5, weight_decay=1e-3, weight_decay_mode="decoupled"
    )
    clone = optimizers.SGD.from_config(opt.get_config())
    assert (clone.momentum, clone.weight_decay_mode) == (0.5, "decoupled")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        optimizers.SGD(weight_decay_mode="pytorch")
