"""Small-loss selection: the parts Co-teaching, Co-teaching+ and JoCoR share.

Each of these methods trains on the `num_remember` samples of a batch with the
smallest loss, a share that starts at the whole batch and shrinks to
`1 - forget_rate` over the first epochs (Han et al., "Co-teaching: Robust training
of deep neural networks with extremely noisy labels", NeurIPS 2018, Algorithm 1,
R(T); https://github.com/bhanML/Co-teaching).

`forget_rate_schedule` and `num_remember` are plain NumPy/Python, as in the
official code; `num_remember_tensor`, `keep_count`, `small_loss_mask` and
`label_precision` are pure TensorFlow ops that run eagerly, inside `tf.function`
and under `tf.function(jit_compile=True)`, with a `num_remember` known only at
run time.
"""

import numpy as np
import tensorflow as tf


def forget_rate_schedule(forget_rate, num_gradual, epochs, exponent=1):
    """The forget rate of each epoch: a linear ramp from 0, then `forget_rate`.

    This is the official code's `rate_schedule` (bhanML/Co-teaching `main.py`,
    hongxin001/JoCoR `algorithm/jocor.py`, and xingruiyu/coteaching_plus `main.py`
    with its default `linear_first` type, which has no exponent): entry `e` is
    `np.linspace(0, forget_rate**exponent, num_gradual)[e]` for `e < num_gradual`,
    and `forget_rate` after.

    Against the paper's keep fraction R(T) = 1 - min(T/T_k * τ_f, τ_f) (Han et
    al. 2018, Algorithm 1, T_k = `num_gradual`, τ_f = `forget_rate`), the ramp
    steps by τ_f/(T_k - 1) instead of τ_f/T_k and reaches τ_f at entry T_k - 1
    instead of T_k. Entry 0 is 0: the whole batch is kept. (The official training
    loops run `for epoch in range(1, n_epoch)` and read entry `epoch`, so their
    first training epoch already uses entry 1; which entry a 0-based epoch reads is
    the caller's choice.) With `exponent` c != 1 the official ramp ends at τ_f**c
    and then jumps to τ_f; this reproduces that.

    A `num_gradual` longer than `epochs` keeps the ramp's slope and truncates it
    to the first `epochs` entries (the official slice assignment raises a NumPy
    broadcast error there instead); `num_gradual` 0 gives `forget_rate`
    throughout, and 1 gives 0 for entry 0 only.

    Args:
        forget_rate: τ_f in [0, 1), the share of each batch dropped once the ramp
            is over (the noise rate, when known).
        num_gradual: T_k >= 0, the length of the ramp in epochs.
        epochs: the number of entries, >= 1.
        exponent: c > 0; the ramp ends at `forget_rate**exponent`.

    Returns:
        float64 NumPy array of shape `[epochs]`.

    Raises:
        ValueError: naming the argument that is out of range.
    """
    if not 0 <= forget_rate < 1:
        raise ValueError(f"forget_rate must be in [0, 1); got {forget_rate!r}.")
    if int(num_gradual) != num_gradual or num_gradual < 0:
        raise ValueError(f"num_gradual must be an integer >= 0; got {num_gradual!r}.")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1; got {epochs!r}.")
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0; got {exponent!r}.")
    schedule = np.full(int(epochs), float(forget_rate))
    ramp = np.linspace(0.0, forget_rate**exponent, int(num_gradual))[: int(epochs)]
    schedule[: len(ramp)] = ramp
    return schedule


def num_remember(forget_rate, batch_size):
    """`int((1 - forget_rate) * batch_size)`: how many samples a batch keeps.

    The official code's count (bhanML/Co-teaching `loss.py`), in Python float64.
    Its rounding is kept on purpose: `(1 - 0.3) * 90` is 62.99999999999999 in
    float64, so 62 samples are kept, not 63.
    """
    return int((1 - forget_rate) * batch_size)


def keep_count(keep_rate, count):
    """`int(keep_rate * count)` as an int32 tensor, computed in float64.

    float64 reproduces Python's float arithmetic bit for bit, so a float64 or
    Python-float `keep_rate` gives the official code's count. float32 would not:
    `(1 - 0.07) * 500` is 464.99999999999994 in float64 (Python keeps 464) but
    rounds to 465 in float32, and such disagreements occur for 384 of the pairs
    (forget rate k/100, batch size 1..512). Pass rates as float64 tensors or
    Python floats: a rate already rounded to float32 has lost that precision (a
    float32 forget rate 0.05 keeps 18 of 20 samples, not 19).
    """
    product = _float64(keep_rate) * tf.cast(count, tf.float64)
    return tf.cast(tf.math.floor(product), tf.int32)


def num_remember_tensor(forget_rate, batch_size):
    """`num_remember` as TensorFlow ops: int32 `int((1 - forget_rate) * batch_size)`.

    `forget_rate` is a scalar tensor or Python float, `batch_size` a scalar int
    tensor (e.g. `tf.shape(logits)[0]`) or Python int. Computed in float64 (see
    `keep_count`), so it equals `num_remember` for every float64 forget rate.
    """
    return keep_count(1.0 - _float64(forget_rate), batch_size)


def _float64(value):
    # tf.cast would first make a Python float a float32 tensor, rounding it.
    return tf.cast(tf.convert_to_tensor(value, dtype_hint=tf.float64), tf.float64)


def small_loss_mask(losses, num_remember, candidates=None):
    """A 0/1 mask of the `num_remember` samples with the smallest losses.

    Sample i is selected when its rank, its position in
    `np.argsort(losses, kind="stable")`, is below `num_remember`: equal losses go
    to the lower index. The rank is counted, `#{j: l_j < l_i} + #{j < i: l_j =
    l_i}`, instead of sorted, so that the tie rule holds on every backend and
    the shapes stay `[B]` under XLA whatever `num_remember` is at run time; the
    O(B^2) comparisons cost nothing next to a forward pass. A NaN loss ranks as
    +inf (after every finite one). No gradient flows through the mask.

    Args:
        losses: float `[B]` per-sample losses.
        num_remember: scalar int (Python or tensor); values above the number of
            candidates select them all, values <= 0 select none.
        candidates: optional bool `[B]`; only these samples can be selected, and
            ranks are counted among them (Co-teaching+'s disagreement set).

    Returns:
        float32 `[B]` mask with `min(max(num_remember, 0), #candidates)` ones.
    """
    losses = tf.cast(losses, tf.float32)
    keys = tf.where(tf.math.is_nan(losses), tf.constant(np.inf, tf.float32), losses)
    index = tf.range(tf.shape(keys)[0])
    # before[i, j]: sample j comes before sample i in the stable ascending order.
    before = (keys[None, :] < keys[:, None]) | (
        (keys[None, :] == keys[:, None]) & (index[None, :] < index[:, None])
    )
    if candidates is not None:
        candidates = tf.cast(candidates, tf.bool)
        before &= candidates[None, :]
    rank = tf.reduce_sum(tf.cast(before, tf.int32), axis=1)
    selected = rank < tf.cast(num_remember, tf.int32)
    if candidates is not None:
        selected &= candidates
    return tf.cast(selected, tf.float32)


def label_precision(mask, noisy_labels, clean_labels):
    """The "pure ratio": the share of selected samples whose label is clean.

    `sum(mask * [noisy == clean]) / sum(mask)`, the official code's
    `pure_ratio` (bhanML/Co-teaching `loss.py`, whose `noise_or_not` is
    `noisy == clean`). When nothing is selected it is 0, not NaN; average it over
    batches with `sample_weight=tf.reduce_sum(mask)` so that such batches weigh
    nothing (the weighted mean is then the pooled precision of all selections).

    Args:
        mask: float or bool `[B]` selection (e.g. from `small_loss_mask`).
        noisy_labels: int `[B]` labels trained on.
        clean_labels: int `[B]` true labels.

    Returns:
        float32 scalar in [0, 1].
    """
    mask = tf.cast(tf.reshape(mask, [-1]), tf.float32)
    clean = tf.equal(
        tf.cast(tf.reshape(noisy_labels, [-1]), tf.int64),
        tf.cast(tf.reshape(clean_labels, [-1]), tf.int64),
    )
    return tf.math.divide_no_nan(
        tf.reduce_sum(mask * tf.cast(clean, tf.float32)), tf.reduce_sum(mask)
    )


class ForgetRate:
    """The forget rate of each epoch, as the official code reads its schedule.

    The official training loop (bhanML/Co-teaching `main.py`, and JoCoR's alike)
    runs `for epoch in range(1, n_epoch)` and reads `rate_schedule[epoch]`: its
    first trained epoch already forgets `forget_rate / (num_gradual - 1)`, and the
    full rate holds from its epoch `num_gradual - 1` on. The 0-based epoch `e`
    here is the official epoch `e + 1`, so it reads entry `e + 1` of
    `forget_rate_schedule` (the paper's R(e) = 1 − min(e/T_k · τ, τ) reaches τ at
    epoch T_k instead).

    Args:
        forget_rate: τ_f in [0, 1).
        num_gradual: T_k, epochs of the linear ramp.
        exponent: c of the ramp's end value τ^c (the official default 1).
    """

    def __init__(self, forget_rate, num_gradual=10, exponent=1):
        self.forget_rate = float(forget_rate)
        self.num_gradual = int(num_gradual)
        self.exponent = float(exponent)
        # Entries 0..T_k: entry T_k and every later epoch hold τ_f.
        self.table = forget_rate_schedule(
            forget_rate, num_gradual, self.num_gradual + 1, exponent
        )

    def __call__(self, epoch):
        """The float64 forget rate of 0-based `epoch` (a tensor or an int)."""
        last = len(self.table) - 1
        index = tf.minimum(tf.cast(epoch, tf.int64) + 1, last)
        return tf.gather(tf.constant(self.table, tf.float64), index)
