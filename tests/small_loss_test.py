import numpy as np
import pytest
import tensorflow as tf

from galkeras.methods import small_loss


def _numpy_small_loss_mask(losses, n, candidates=None):
    index = np.arange(len(losses))
    if candidates is not None:
        index = index[candidates]
    keys = np.where(np.isnan(losses[index]), np.inf, losses[index])
    mask = np.zeros(len(losses), np.float32)
    mask[index[np.argsort(keys, kind="stable")[: max(n, 0)]]] = 1.0
    return mask


@pytest.mark.parametrize(
    "args, want",
    [
        ((0.5, 5, 8), [0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5]),
        ((0.45, 10, 12), [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4] + [0.45] * 3),
        ((0.5, 3, 5, 2), [0, 0.125, 0.25, 0.5, 0.5]),  # ramps to 0.5**2, then jumps
        ((0.5, 5, 3), [0, 0.125, 0.25]),  # the ramp truncated, its slope kept
        ((0.2, 0, 3), [0.2, 0.2, 0.2]),
        ((0.2, 1, 3), [0, 0.2, 0.2]),
        ((0.0, 4, 2), [0, 0]),
    ],
)
def test_forget_rate_schedule_matches_hand_written_tables(args, want):
    got = small_loss.forget_rate_schedule(*args)
    assert got.dtype == np.float64 and got.shape == (len(want),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(forget_rate=1.0, num_gradual=5, epochs=8), "forget_rate"),
        (dict(forget_rate=-0.1, num_gradual=5, epochs=8), "forget_rate"),
        (dict(forget_rate=float("nan"), num_gradual=5, epochs=8), "forget_rate"),
        (dict(forget_rate=0.2, num_gradual=-1, epochs=8), "num_gradual"),
        (dict(forget_rate=0.2, num_gradual=2.5, epochs=8), "num_gradual"),
        (dict(forget_rate=0.2, num_gradual=5, epochs=0), "epochs"),
        (dict(forget_rate=0.2, num_gradual=5, epochs=8, exponent=0), "exponent"),
    ],
)
def test_forget_rate_schedule_refuses_bad_arguments_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        small_loss.forget_rate_schedule(**kwargs)


def test_num_remember_keeps_the_official_float64_rounding():
    assert small_loss.num_remember(0.2, 10) == 8  # 8.000000000000002
    assert small_loss.num_remember(0.3, 90) == 62  # 62.99999999999999
    assert small_loss.num_remember(0.07, 500) == 464
    assert small_loss.num_remember(0.0, 7) == 7


def test_num_remember_tensor_equals_python_for_every_rate_and_batch_size():
    rates = np.arange(100) / 100  # float64, as forget_rate_schedule gives them
    sizes = np.arange(1, 513)
    want = [[small_loss.num_remember(r, n) for n in sizes] for r in rates]
    compiled = tf.function(
        small_loss.num_remember_tensor, jit_compile=True, autograph=False
    )
    for fn in (small_loss.num_remember_tensor, compiled):
        got = fn(tf.constant(rates[:, None]), tf.constant(sizes[None, :], tf.int32))
        assert got.dtype == tf.int32
        np.testing.assert_array_equal(got.numpy(), want)
    # Python floats are taken as float64, not rounded to float32 first.
    # (A float32 0.05 keeps 18 of 20.)
    for r, n, kept in ((0.05, 20, 19), (0.05, 100, 95), (0.3, 90, 62)):
        assert small_loss.num_remember_tensor(r, n).numpy() == kept


def test_keep_count_floors_in_float64():
    assert small_loss.keep_count(1 - 0.07, 500).numpy() == 464
    assert small_loss.keep_count(tf.constant(0.5, tf.float64), 7).numpy() == 3
    assert small_loss.keep_count(0.999, 0).numpy() == 0


def test_small_loss_mask_breaks_ties_by_lower_index():
    losses = tf.constant([1.0, 0.5, 0.5, 2.0, 0.5])
    np.testing.assert_array_equal(
        small_loss.small_loss_mask(losses, 2).numpy(), [0, 1, 1, 0, 0]
    )
    np.testing.assert_array_equal(
        small_loss.small_loss_mask(losses, 4).numpy(), [1, 1, 1, 0, 1]
    )


def test_small_loss_mask_ranks_nan_last():
    losses = tf.constant([np.nan, 1.0, 0.0])
    np.testing.assert_array_equal(
        small_loss.small_loss_mask(losses, 2).numpy(), [0, 1, 1]
    )


def test_small_loss_mask_matches_stable_argsort_eagerly_and_compiled():
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=10).astype(np.float32)
    losses[[2, 7, 9]] = losses[4]  # a four-way tie
    candidates = rng.random(10) < 0.6
    compiled = tf.function(
        small_loss.small_loss_mask, jit_compile=True, autograph=False
    )
    for n in range(-1, 13):
        want = _numpy_small_loss_mask(losses, n)
        want_in = _numpy_small_loss_mask(losses, n, candidates)
        # One trace serves every n: num_remember is a run-time tensor.
        n_t = tf.constant(n)
        for fn in (small_loss.small_loss_mask, compiled):
            got = fn(losses, n_t)
            assert got.dtype == tf.float32
            np.testing.assert_array_equal(got.numpy(), want)
            np.testing.assert_array_equal(fn(losses, n_t, candidates).numpy(), want_in)
    assert compiled.experimental_get_tracing_count() == 2  # with/without candidates


def test_label_precision_is_the_clean_share_of_the_selection():
    mask = tf.constant([1.0, 1.0, 0.0, 1.0])
    noisy = tf.constant([0, 1, 2, 2])
    clean = tf.constant([0, 2, 0, 2], tf.int64)
    compiled = tf.function(
        small_loss.label_precision, jit_compile=True, autograph=False
    )
    for fn in (small_loss.label_precision, compiled):
        np.testing.assert_allclose(fn(mask, noisy, clean).numpy(), 2 / 3, rtol=1e-6)
        # Nothing selected: 0, not NaN.
        assert fn(tf.zeros([4]), noisy, clean).numpy() == 0.0
