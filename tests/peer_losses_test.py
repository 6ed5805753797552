import math

import numpy as np
import pytest
import tensorflow as tf

from galkeras.methods import peer_losses

B, K = 10, 4


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits_1 = (2 * rng.normal(size=(B, K))).astype(np.float32)
    logits_2 = (2 * rng.normal(size=(B, K))).astype(np.float32)
    labels = rng.integers(0, K, size=B)
    return logits_1, logits_2, labels


def _numpy_log_softmax(z):
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _numpy_cross_entropy(z, labels):
    return -_numpy_log_softmax(z)[np.arange(len(labels)), labels]


def _numpy_selection(losses, n, rows=None):
    """Indices of the n smallest losses among `rows`, ties to the lower index."""
    rows = np.arange(len(losses)) if rows is None else rows
    return rows[np.argsort(losses[rows], kind="stable")[:n]]


def _numpy_mask(indices):
    mask = np.zeros(B, np.float32)
    mask[indices] = 1
    return mask


def _numpy_coteaching(z1, z2, labels, n, divide_twice):
    ce_1, ce_2 = _numpy_cross_entropy(z1, labels), _numpy_cross_entropy(z2, labels)
    s_1, s_2 = _numpy_selection(ce_1, n), _numpy_selection(ce_2, n)
    loss_1, loss_2 = ce_1[s_2].mean(), ce_2[s_1].mean()
    if divide_twice:
        loss_1, loss_2 = loss_1 / n, loss_2 / n
    return loss_1, loss_2, _numpy_mask(s_1), _numpy_mask(s_2)


@pytest.mark.parametrize("divide_twice", [False, True])
def test_coteaching_matches_numpy(batch, divide_twice):
    z1, z2, labels = batch
    for n in (1, 4, 7, B):
        got = peer_losses.coteaching_losses(
            z1, z2, labels, tf.constant(n), divide_twice=divide_twice
        )
        want = _numpy_coteaching(z1, z2, labels, n, divide_twice)
        for g, w in zip(got, want):
            assert g.dtype == tf.float32
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5)


def test_coteaching_exchange_by_hand():
    # Network 1 finds rows 0, 1 clean and network 2 rows 2, 3: the sets are
    # disjoint, so each loss shows whose selection it used.
    labels = np.zeros(4, np.int64)
    z1 = np.array([[5, 0], [4, 0], [0, 0], [-1, 0]], np.float32)
    z2 = np.array([[0, 0], [-2, 0], [5, 0], [4, 0]], np.float32)
    loss_1, loss_2, mask_1, mask_2 = peer_losses.coteaching_losses(z1, z2, labels, 2)
    np.testing.assert_array_equal(mask_1.numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(mask_2.numpy(), [0, 0, 1, 1])
    # CE of logits [a, 0] against class 0 is log(1 + e^-a).
    np.testing.assert_allclose(
        loss_1.numpy(), (math.log(2) + math.log(1 + math.e)) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        loss_2.numpy(), (math.log(2) + math.log(1 + math.e**2)) / 2, rtol=1e-6
    )
    twice = peer_losses.coteaching_losses(z1, z2, labels, 2, divide_twice=True)
    np.testing.assert_allclose(twice[0].numpy(), loss_1.numpy() / 2, rtol=1e-6)


def test_coteaching_gradients_reach_only_the_peers_selection(batch):
    z1, z2, labels = (tf.constant(x) for x in batch)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z1, z2])
        loss_1, loss_2, mask_1, mask_2 = peer_losses.coteaching_losses(
            z1, z2, labels, 4
        )
    assert not np.array_equal(mask_1.numpy(), mask_2.numpy())
    grad_1 = tape.gradient(loss_1, z1).numpy()
    assert tape.gradient(loss_1, z2) is None  # no gradient through the masks
    assert np.all(np.abs(grad_1).sum(axis=1)[mask_2.numpy() == 1] > 0)
    assert np.all(grad_1[mask_2.numpy() == 0] == 0)
    grad_2 = tape.gradient(loss_2, z2).numpy()
    assert np.all(grad_2[mask_1.numpy() == 0] == 0)


def test_coteaching_with_nothing_selected_is_zero_not_nan(batch):
    z1, z2, labels = (tf.constant(x) for x in batch)
    with tf.GradientTape() as tape:
        tape.watch(z1)
        loss_1, *_ = peer_losses.coteaching_losses(z1, z2, labels, 0)
    assert loss_1.numpy() == 0.0
    np.testing.assert_array_equal(tape.gradient(loss_1, z1).numpy(), 0.0)


def test_float16_logits_are_computed_in_float32(batch):
    z1, z2, labels = batch
    full = peer_losses.jocor_loss(z1, z2, labels, 6, 0.9)
    half = peer_losses.jocor_loss(
        z1.astype(np.float16), z2.astype(np.float16), labels, 6, 0.9
    )
    assert half[0].dtype == tf.float32
    np.testing.assert_allclose(half[0].numpy(), full[0].numpy(), rtol=1e-2)
    losses = peer_losses.coteaching_losses(z1.astype(np.float16), z2, labels, 6)
    assert all(x.dtype == tf.float32 for x in losses)


def _numpy_coteaching_plus(z1, z2, labels, keep_rate, divide_twice, softmax_twice):
    rows = np.flatnonzero(z1.argmax(axis=1) != z2.argmax(axis=1))
    n = int(keep_rate * len(rows)) or len(rows)
    if softmax_twice:
        z1, z2 = np.exp(_numpy_log_softmax(z1)), np.exp(_numpy_log_softmax(z2))
    ce_1, ce_2 = _numpy_cross_entropy(z1, labels), _numpy_cross_entropy(z2, labels)
    s_1, s_2 = _numpy_selection(ce_1, n, rows), _numpy_selection(ce_2, n, rows)
    loss_1, loss_2 = ce_1[s_2].mean(), ce_2[s_1].mean()
    if divide_twice:
        loss_1, loss_2 = loss_1 / n, loss_2 / n
    return loss_1, loss_2, _numpy_mask(s_1), _numpy_mask(s_2), 1.0


@pytest.mark.parametrize("divide_twice, softmax_twice", [(False, False), (True, True)])
def test_coteaching_plus_matches_numpy(batch, divide_twice, softmax_twice):
    z1, z2, labels = batch
    disagree = np.flatnonzero(z1.argmax(axis=1) != z2.argmax(axis=1))
    assert 4 <= len(disagree) < B  # the fixture has a non-trivial D
    for keep_rate in (0.5, 0.8, 1.0):
        got = peer_losses.coteaching_plus_losses(
            z1,
            z2,
            labels,
            tf.constant(keep_rate, tf.float64),
            divide_twice=divide_twice,
            softmax_twice=softmax_twice,
        )
        want = _numpy_coteaching_plus(
            z1, z2, labels, keep_rate, divide_twice, softmax_twice
        )
        for g, w in zip(got, want):
            assert g.dtype == tf.float32
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5)


def _coteaching_plus_with_gradients(z1, z2, labels, keep_rate):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z1, z2])
        outputs = peer_losses.coteaching_plus_losses(z1, z2, labels, keep_rate)
    grads = [tape.gradient(outputs[i], z) for i, z in ((0, z1), (1, z2))]
    return outputs, grads


def test_coteaching_plus_with_an_empty_disagreement_set_does_not_update(batch):
    z1, _, labels = batch
    z1 = tf.constant(z1)
    z2 = 3.0 * z1 + 1.0  # the same argmax everywhere
    (loss_1, loss_2, mask_1, mask_2, update), grads = _coteaching_plus_with_gradients(
        z1, z2, labels, 0.8
    )
    assert update.numpy() == 0.0
    assert loss_1.numpy() == 0.0 and loss_2.numpy() == 0.0
    np.testing.assert_array_equal(mask_1.numpy() + mask_2.numpy(), 0)
    for grad in grads:
        assert np.all(np.isfinite(grad.numpy())) and np.all(grad.numpy() == 0)


def test_coteaching_plus_trains_on_a_single_disagreement(batch):
    z1, _, labels = batch
    z2 = 3.0 * z1 + 1.0
    row = 6
    z2[row] = -z1[row]  # the argmax changes in this row only
    z1, z2 = tf.constant(z1), tf.constant(z2)
    # int(0.8 * 1) is 0: the official code then keeps all of D.
    (loss_1, loss_2, mask_1, mask_2, update), grads = _coteaching_plus_with_gradients(
        z1, z2, labels, 0.8
    )
    assert update.numpy() == 1.0
    np.testing.assert_array_equal(mask_1.numpy(), np.eye(B)[row])
    np.testing.assert_array_equal(mask_2.numpy(), np.eye(B)[row])
    want_1 = _numpy_cross_entropy(z1.numpy(), labels)[row]
    np.testing.assert_allclose(loss_1.numpy(), want_1, rtol=1e-5)
    for grad in grads:
        grad = grad.numpy()
        assert np.abs(grad[row]).sum() > 0
        assert np.all(np.delete(grad, row, axis=0) == 0)


def _numpy_jocor(z1, z2, labels, n, co_lambda):
    log_p1, log_p2 = _numpy_log_softmax(z1), _numpy_log_softmax(z2)
    p1, p2 = np.exp(log_p1), np.exp(log_p2)
    kl_2_1 = (p2 * (log_p2 - log_p1)).sum(axis=1)  # KL(p2 || p1)
    kl_1_2 = (p1 * (log_p1 - log_p2)).sum(axis=1)  # KL(p1 || p2)
    ce = _numpy_cross_entropy(z1, labels) + _numpy_cross_entropy(z2, labels)
    losses = (1 - co_lambda) * ce + co_lambda * (kl_2_1 + kl_1_2)
    selected = _numpy_selection(losses, n)
    return losses[selected].mean(), _numpy_mask(selected)


def test_jocor_matches_numpy(batch):
    z1, z2, labels = batch
    for n, co_lambda in ((3, 0.1), (7, 0.9), (B, 0.65), (1, 0.0)):
        loss, mask = peer_losses.jocor_loss(z1, z2, labels, n, co_lambda)
        want_loss, want_mask = _numpy_jocor(z1, z2, labels, n, co_lambda)
        np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5)
        np.testing.assert_array_equal(mask.numpy(), want_mask)


def _jocor_with_gradients(z1, z2, labels, n, co_lambda):
    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        loss, mask = peer_losses.jocor_loss(z1, z2, labels, n, co_lambda)
    return mask, tape.gradient(loss, [z1, z2])


def _numpy_jocor_gradient(z1, z2, labels, mask, co_lambda):
    """d loss / d z1, by hand: CE gives p1 - onehot; KL(p2||p1) gives p1 - p2;
    KL(p1||p2) gives p1 * (d - <p1, d>) with d = log p1 - log p2."""
    log_p1, log_p2 = _numpy_log_softmax(z1), _numpy_log_softmax(z2)
    p1, p2 = np.exp(log_p1), np.exp(log_p2)
    d = log_p1 - log_p2
    kl = (p1 - p2) + p1 * (d - (p1 * d).sum(axis=1, keepdims=True))
    ce = p1 - np.eye(z1.shape[1])[labels]
    return mask[:, None] * ((1 - co_lambda) * ce + co_lambda * kl) / mask.sum()


def test_jocor_gradients_flow_into_both_networks_on_selected_rows_only(batch):
    z1, z2, labels = (tf.constant(x) for x in batch)
    for co_lambda in (0.9, 1.0):
        mask, grads = _jocor_with_gradients(z1, z2, labels, 6, co_lambda)
        selected = mask.numpy() == 1
        assert selected.sum() == 6
        for grad in grads:
            assert grad is not None
            grad = grad.numpy()
            assert np.all(np.abs(grad[selected]).sum(axis=1) > 0)
            assert np.all(grad[~selected] == 0)
        # Both KL terms reach both networks: a stopped side would drop a term.
        z1_, z2_, y = z1.numpy(), z2.numpy(), labels.numpy()
        want_1 = _numpy_jocor_gradient(z1_, z2_, y, mask.numpy(), co_lambda)
        want_2 = _numpy_jocor_gradient(z2_, z1_, y, mask.numpy(), co_lambda)
        np.testing.assert_allclose(grads[0].numpy(), want_1, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(grads[1].numpy(), want_2, rtol=1e-4, atol=1e-7)


def _every_loss_and_gradient(z1, z2, labels, n, keep_rate, co_lambda):
    """Each method's outputs, the gradients of Co-teaching+'s losses and the
    gradients of a weighted sum of the other losses, in one list."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z1, z2])
        coteaching = peer_losses.coteaching_losses(z1, z2, labels, n)
        plus = peer_losses.coteaching_plus_losses(z1, z2, labels, keep_rate)
        jocor = peer_losses.jocor_loss(z1, z2, labels, n, co_lambda)
        others = coteaching[0] + 2.0 * coteaching[1] + 3.0 * jocor[0]
        plus_total = plus[0] + plus[1]
    quirks = [
        *peer_losses.coteaching_losses(z1, z2, labels, n, divide_twice=True),
        *peer_losses.coteaching_plus_losses(
            z1, z2, labels, keep_rate, divide_twice=True, softmax_twice=True
        ),
    ]
    return [
        *coteaching,
        *plus,
        *jocor,
        *quirks,
        *tape.gradient(others, [z1, z2]),
        *tape.gradient(plus_total, [z1, z2]),
    ]


def test_every_loss_compiles_with_xla_to_the_eager_result(batch):
    z1, z2, labels = (tf.constant(x) for x in batch)
    agreeing = 3.0 * z1 + 1.0  # Co-teaching+'s disagreement set is empty
    compiled = tf.function(_every_loss_and_gradient, jit_compile=True, autograph=False)
    # Counts, rates and D are known at run time only: one compilation serves all.
    for z, n, keep_rate, co_lambda in (
        (z2, 4, 0.8, 0.9),
        (z2, B, 0.5, 0.1),
        (agreeing, 0, 1.0, 0.65),
    ):
        args = (
            tf.constant(n),
            tf.constant(keep_rate, tf.float64),
            tf.constant(co_lambda),
        )
        eager = _every_loss_and_gradient(z1, z, labels, *args)
        got = compiled(z1, z, labels, *args)
        for g, e in zip(got, eager, strict=True):
            assert g.dtype == e.dtype and np.all(np.isfinite(g.numpy()))
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)
    # The last batch: no update, and Co-teaching+'s gradients are exactly zero.
    assert got[8].numpy() == 0.0
    assert np.all(got[-1].numpy() == 0) and np.all(got[-2].numpy() == 0)
    assert compiled.experimental_get_tracing_count() == 1
