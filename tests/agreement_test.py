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


def _numpy_channel_cosines(a, b):
    a = a.reshape(-1, a.shape[-1] if a.ndim else 1).astype(np.float64)
    b = b.reshape(-1, b.shape[-1] if b.ndim else 1).astype(np.float64)
    return [_numpy_cosine(a[:, c], b[:, c]) for c in range(a.shape[1])]


def test_channel_cosines_match_numpy_for_conv_dense_bias_and_scalar():
    rng = np.random.default_rng(1)
    shapes = [(3, 3, 2, 4), (5, 3), (4,), ()]
    grads_a = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads_b = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads_a[0][..., 1] = 0.0  # a zero channel: coefficient 0
    grads_b[1][:, 2] = 3.0 * grads_a[1][:, 2]  # same direction: 1
    grads_a[2][0] = 1e-12  # 1-value cosines are signs, however small the values
    grads_b[2][0] = 3e-12
    got = agreement.channel_agreement(grads_a, grads_b)
    assert [tuple(c.shape) for c in got] == [(4,), (3,), (4,), ()]
    for c, a, b in zip(got, grads_a, grads_b):
        assert c.dtype == tf.float32
        np.testing.assert_allclose(
            np.ravel(c.numpy()), _numpy_channel_cosines(a, b), atol=1e-6
        )
    assert got[0].numpy()[1] == 0.0 and got[2].numpy()[0] == 1.0
    np.testing.assert_array_equal(got[2].numpy(), np.sign(grads_a[2] * grads_b[2]))


def test_element_coefficients_are_sign_products_with_zeros_giving_zero():
    a = [np.array([[1.0, -2.0, 0.0], [3.0, 0.5, -1e-30]], np.float32)]
    b = [np.array([[2.0, 1.0, 5.0], [0.0, 1e-30, -4.0]], np.float32)]
    got = agreement.element_agreement(a, b)[0]
    assert got.dtype == tf.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(got.numpy(), [[1, -1, 0], [0, 1, 1]])
    # Any τ in (0, 1] means "same sign".
    for tau in (1e-6, 0.4, 1.0):
        gates = agreement.agreement_gates([got], tau)[0].numpy()
        np.testing.assert_array_equal(gates, [[1, 0, 0], [0, 1, 1]])


def test_float16_gradients_give_float32_coefficients_at_every_granularity():
    a = [np.array([[1e-3, -2e-3], [3e-3, 4e-3]], np.float16)]
    b = [np.array([[1e-3, 2e-3], [3e-3, 4e-3]], np.float16)]
    for granularity in agreement.GRANULARITIES:
        got = agreement.agreement_coefficients(a, b, granularity)
        assert all(c.dtype == tf.float32 for c in got)
    channel = agreement.agreement_coefficients(a, b, "channel")[0].numpy()
    want = _numpy_channel_cosines(a[0].astype(np.float32), b[0].astype(np.float32))
    np.testing.assert_allclose(channel, want, atol=1e-6)


def test_open_shares_count_scalar_parameters_at_every_granularity():
    # A [2, 2] kernel with one of its two channels open, a [3] bias with one open
    # element: shares 1/2 and 1/3; scalars open (2 + 1) / 7.
    gates = [tf.constant([True, False]), tf.constant([False, True, False])]
    shares = agreement.open_shares(gates)
    np.testing.assert_allclose(shares.numpy(), [0.5, 1 / 3])
    var_frac, param_frac = agreement.open_fractions(shares, tf.constant([4.0, 3.0]))
    np.testing.assert_allclose([var_frac, param_frac], [(0.5 + 1 / 3) / 2, 3 / 7])


def test_random_element_gates_near_p_deterministic_and_variable_draw_unchanged():
    shapes = [(20, 30, 4), (50,), ()]
    seed = tf.constant([3, 7])
    gates = agreement.random_unit_gates(shapes, 0.3, seed, "element")
    again = agreement.random_unit_gates(shapes, 0.3, seed, "element")
    other = agreement.random_unit_gates(shapes, 0.3, tf.constant([3, 8]), "element")
    assert [tuple(g.shape) for g in gates] == shapes
    for g, h in zip(gates, again):
        np.testing.assert_array_equal(g.numpy(), h.numpy())
    flat = np.concatenate([np.ravel(g.numpy()) for g in gates])
    assert abs(flat.mean() - 0.3) < 0.02
    assert not np.array_equal(flat, np.concatenate([np.ravel(g) for g in other]))
    # The variable granularity keeps the per-variable draw it always had.
    by_variable = agreement.random_unit_gates(shapes, 0.3, seed, "variable")
    np.testing.assert_array_equal(
        [g.numpy() for g in by_variable], agreement.random_gates(3, 0.3, seed).numpy()
    )
