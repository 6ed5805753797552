"""The losses of GAL's co-training peers: Co-teaching, Co-teaching+ and JoCoR.

Each function maps the two networks' logits on one batch, the (noisy) labels and
the batch's keep count or rate to the losses its method minimises, plus the
small-loss masks for the pure-ratio diagnostic (`small_loss.label_precision`).
The selection itself, the count and the forget-rate schedule are in
`galkeras.methods.small_loss`.

Everything is computed in float32 (logits are cast first, so float16 logits of
mixed precision are fine) with TensorFlow ops only, so each function runs eagerly,
inside `tf.function` and under `tf.function(jit_compile=True)`; counts may be
tensors known only at run time. A selection that is empty gives a zero loss with
a zero (finite) gradient, never NaN. Masks carry no gradient: selection is by the
losses' values.

References:
- Han et al., "Co-teaching: Robust training of deep neural networks with
  extremely noisy labels", NeurIPS 2018; https://github.com/bhanML/Co-teaching
- Yu et al., "How does disagreement help generalization against label
  corruption?", ICML 2019; https://github.com/xingruiyu/coteaching_plus
- Wei et al., "Combating noisy labels by agreement: A joint training method with
  co-regularization", CVPR 2020; https://github.com/hongxin001/JoCoR
"""

import tensorflow as tf

from galkeras.methods import small_loss


def coteaching_losses(logits_1, logits_2, labels, num_remember, divide_twice=False):
    """Co-teaching's exchanged small-loss losses (Han et al. 2018, Algorithm 1).

    With per-sample cross entropies ℓ¹, ℓ², S¹ is the `num_remember` samples of
    smallest ℓ¹ and S² likewise; each network learns from the samples its peer
    selected (the exchange):
    `loss_1 = mean_{i∈S²} ℓ¹_i`, `loss_2 = mean_{i∈S¹} ℓ²_i`.

    `divide_twice=True` reproduces the official `loss_coteaching`
    (bhanML/Co-teaching `loss.py`): `F.cross_entropy(y_1[ind_2_update],
    t[ind_2_update])` already averages over the selected samples (PyTorch's
    default mean reduction), and the function returns `torch.sum(loss_1_update) /
    num_remember`, the sum of that one scalar divided by `num_remember` again, so
    its loss is `sum_{i∈S²} ℓ¹_i / num_remember²`. Adam, which the official code
    uses, is nearly invariant to that constant scale; SGD's step shrinks by
    `num_remember`. The default divides once.

    Args:
        logits_1: float `[B, K]` logits of network 1.
        logits_2: float `[B, K]` logits of network 2.
        labels: int `[B]` (noisy) labels.
        num_remember: scalar int, e.g. `small_loss.num_remember_tensor(rate, B)`.
            0 selects nothing (zero losses; the official code would give NaN).
        divide_twice: divide by the number selected twice, as the official code.

    Returns:
        `(loss_1, loss_2, mask_1, mask_2)`: float32 scalar losses of networks 1
        and 2, and float32 `[B]` 0/1 masks of S¹ and S².
    """
    ce_1 = _cross_entropy(logits_1, labels)
    ce_2 = _cross_entropy(logits_2, labels)
    mask_1 = small_loss.small_loss_mask(ce_1, num_remember)
    mask_2 = small_loss.small_loss_mask(ce_2, num_remember)
    # The exchange: network 1 learns from S², network 2 from S¹.
    loss_1 = _selected_mean(ce_1, mask_2, divide_twice)
    loss_2 = _selected_mean(ce_2, mask_1, divide_twice)
    return loss_1, loss_2, mask_1, mask_2


def coteaching_plus_losses(
    logits_1,
    logits_2,
    labels,
    keep_rate,
    divide_twice=False,
    softmax_twice=False,
):
    """Co-teaching+'s small-loss exchange inside the disagreement set (Yu et al.
    2019, Algorithm 1).

    D = {i : argmax z¹_i != argmax z²_i}; Co-teaching's exchange (see
    `coteaching_losses`) runs inside D with `num_remember = int(keep_rate * |D|)`
    (float64, as `small_loss.keep_count`). Following the official
    `loss_coteaching_plus` (xingruiyu/coteaching_plus `loss.py`):

    - a non-empty D whose `int(keep_rate * |D|)` is 0 (e.g. |D| = 1) trains on
      all of D: its `loss_coteaching` falls back to the whole set when the kept
      slice is empty;
    - an empty D gives `update` 0 and zero losses with zero gradients. The
      official code instead returns `sum(update_step * CE) / B`, with CE the mean
      cross entropy of the whole batch (of the probabilities, see
      `softmax_twice`) and `update_step` 1 for every sample while
      `step < 5000` and 0 after, where `step` is `epoch * i` (the epoch number
      times the batch index, not a global step): early batches with an empty D
      train on the full batch, later ones get a zero loss (whose optimizer step
      still moves Adam's parameters through its moments). A caller that wants that
      warm-up applies plain cross entropy itself; this function only reports
      `update`.

    Quirks of the official code, reproducible by flag:

    - `divide_twice`: the loss is divided by `num_remember` twice, as in
      Co-teaching's official code (see `coteaching_losses`).
    - `softmax_twice`: the official code passes `F.softmax(logits)` to
      `F.cross_entropy`, which applies log-softmax again, so its losses (both for
      ranking and for training) are the cross entropy of `softmax(p)`, p the
      probabilities (only from `init_epoch` on: its plain Co-teaching before
      then takes the logits); default: the cross entropy of the logits.

    Not reproduced: the official D drops the sample whose dataset index is 0 (it
    filters `ind * disagree` for nonzero entries) and then, to match lengths,
    truncates the in-batch positions of D, dropping the last one instead; this
    touches at most one batch per epoch.

    Before `init_epoch` the method is plain Co-teaching (`coteaching_losses`);
    that choice belongs to the caller. The official `main.py` sets `init_epoch`
    to 0 for MNIST and 20 Newsgroups, 20 for CIFAR-10, 5 for CIFAR-100 and 100
    for Tiny-ImageNet.

    Args:
        logits_1: float `[B, K]` logits of network 1.
        logits_2: float `[B, K]` logits of network 2.
        labels: int `[B]` (noisy) labels.
        keep_rate: scalar `1 - forget_rate`, a Python float or float64 tensor
            (float32 would round the count differently from the official code).
        divide_twice: divide by the number selected twice, as the official code.
        softmax_twice: take cross entropy of the softmax probabilities, as the
            official code.

    Returns:
        `(loss_1, loss_2, mask_1, mask_2, update)`: float32 scalar losses of
        networks 1 and 2; float32 `[B]` masks of S¹ and S² (both inside D); and
        float32 `update`, 1 when D is non-empty and 0 otherwise.
    """
    logits_1 = tf.cast(logits_1, tf.float32)
    logits_2 = tf.cast(logits_2, tf.float32)
    disagree = tf.not_equal(tf.argmax(logits_1, axis=-1), tf.argmax(logits_2, axis=-1))
    num_disagree = tf.reduce_sum(tf.cast(disagree, tf.int32))
    num_remember = small_loss.keep_count(keep_rate, num_disagree)
    num_remember = tf.where(num_remember > 0, num_remember, num_disagree)
    if softmax_twice:
        logits_1, logits_2 = tf.nn.softmax(logits_1), tf.nn.softmax(logits_2)
    ce_1 = _cross_entropy(logits_1, labels)
    ce_2 = _cross_entropy(logits_2, labels)
    mask_1 = small_loss.small_loss_mask(ce_1, num_remember, candidates=disagree)
    mask_2 = small_loss.small_loss_mask(ce_2, num_remember, candidates=disagree)
    loss_1 = _selected_mean(ce_1, mask_2, divide_twice)
    loss_2 = _selected_mean(ce_2, mask_1, divide_twice)
    update = tf.cast(num_disagree > 0, tf.float32)
    return loss_1, loss_2, mask_1, mask_2, update


def jocor_loss(logits_1, logits_2, labels, num_remember, co_lambda):
    """JoCoR's joint loss over one shared small-loss set (Wei et al. 2020, Algorithm 1).

    Per sample, with p = softmax(z):
    `ℓ_i = (1 - λ)[CE(z¹_i, ỹ_i) + CE(z²_i, ỹ_i)] + λ[KL(p²_i‖p¹_i) + KL(p¹_i‖p²_i)]`;
    S is the `num_remember` samples of smallest ℓ, and `loss = mean_{i∈S} ℓ_i`,
    one loss for one update of both networks. Gradients flow into both logits
    through every term (neither side of a KL is stopped).

    As the official `loss_jocor` (hongxin001/JoCoR `algorithm/loss.py`):
    `kl_loss_compute(pred, soft_targets)` is `F.kl_div(log_softmax(pred),
    softmax(soft_targets))` summed over classes, i.e. KL(softmax(soft_targets) ‖
    softmax(pred)) per sample, so `kl_loss_compute(y_1, y_2)` is KL(p²‖p¹) and
    `kl_loss_compute(y_2, y_1)` is KL(p¹‖p²) (their sum is symmetric, so the
    direction of each term does not change the loss); the selected losses are
    averaged once (`torch.mean`). λ: the official argparse default is 0.1, while
    its README recommends 0.5-0.9 (0.9 for CIFAR-10 at 20%, 50% and asymmetric
    40% noise, 0.65 at 80%, 0.85 for CIFAR-100).

    Args:
        logits_1: float `[B, K]` logits of network 1.
        logits_2: float `[B, K]` logits of network 2.
        labels: int `[B]` (noisy) labels.
        num_remember: scalar int, e.g. `small_loss.num_remember_tensor(rate, B)`.
        co_lambda: λ in [0, 1], the weight of the co-regularisation.

    Returns:
        `(loss, mask)`: float32 scalar loss and float32 `[B]` 0/1 mask of S.
    """
    logits_1 = tf.cast(logits_1, tf.float32)
    logits_2 = tf.cast(logits_2, tf.float32)
    co_lambda = tf.cast(co_lambda, tf.float32)
    log_p1 = tf.nn.log_softmax(logits_1)
    log_p2 = tf.nn.log_softmax(logits_2)
    kl_21 = tf.reduce_sum(tf.exp(log_p2) * (log_p2 - log_p1), axis=-1)
    kl_12 = tf.reduce_sum(tf.exp(log_p1) * (log_p1 - log_p2), axis=-1)
    cross_entropy = _cross_entropy(logits_1, labels) + _cross_entropy(logits_2, labels)
    losses = (1.0 - co_lambda) * cross_entropy + co_lambda * (kl_21 + kl_12)
    mask = small_loss.small_loss_mask(losses, num_remember)
    return _selected_mean(losses, mask), mask


def _cross_entropy(logits, labels):
    """Per-sample cross entropy `[B]` in float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(tf.reshape(labels, [-1]), tf.int32),
        logits=tf.cast(logits, tf.float32),
    )


def _selected_mean(losses, mask, divide_twice=False):
    """The mean of `losses` over `mask`; 0, with a zero gradient, over nothing."""
    count = tf.reduce_sum(mask)
    mean = tf.math.divide_no_nan(tf.reduce_sum(mask * losses), count)
    if divide_twice:
        mean = tf.math.divide_no_nan(mean, count)
    return mean
