import numpy as np
import tensorflow as tf

from galkeras import agreement


def _numpy_cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return 0.0 if denominator == 0 else float(a @ b / denominator)


def test_cosine_matches_numpy_per_variable():
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 2, 4), (4,), (5, 3), (1,)]
    grads_a = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads_b = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads_b[1] = 2.5 * grads_a[1]  # same direction: cosine 1
    grads_b[2] = -grads_a[2]  # opposite: cosine -1
    got = agreement.gradient_agreement(grads_a, grads_b).numpy()
    want = [_numpy_cosine(a, b) for a, b in zip(grads_a, grads_b)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[1] == np.float32(1.0) or abs(got[1] - 1) < 1e-6
    assert abs(got[2] + 1) < 1e-6


def test_zero_gradient_gives_zero_and_float16_is_computed_in_float32():
    a = [np.zeros((3,), np.float32), np.array([1e-3, 2e-3], np.float16)]
    b = [np.ones((3,), np.float32), np.array([1e-3, 2e-3], np.float16)]
    got = agreement.gradient_agreement(a, b)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), [0.0, 1.0], atol=1e-3)


def test_gates_open_at_tau_inclusive():
    coefficients = tf.constant([0.39, 0.4, 0.41, -1.0, 1.0])
    gates = agreement.agreement_gates(coefficients, 0.4).numpy()
    np.testing.assert_array_equal(gates, [False, True, True, False, True])


def test_open_fractions_by_variables_and_parameters():
    gates = tf.constant([True, False, True])
    sizes = tf.constant([10.0, 80.0, 10.0])
    var_frac, param_frac = agreement.open_fractions(gates, sizes)
    np.testing.assert_allclose([var_frac.numpy(), param_frac.numpy()], [2 / 3, 0.2])


def test_random_gates_are_stateless_and_near_p():
    seed = tf.constant([3, 7])
    first = agreement.random_gates(20000, 0.8, seed).numpy()
    again = agreement.random_gates(20000, 0.8, seed).numpy()
    np.testing.assert_array_equal(first, again)
    assert abs(first.mean() - 0.8) < 0.01
