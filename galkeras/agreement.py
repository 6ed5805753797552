"""Gradient agreement: the per-variable cosine of the twins' gradients and its gate.

Implements Eq. (4)-(5) of Yan et al., "Gradient Agreement Hinders the Memorization of
Noisy Labels" (Applied Sciences 2023, 13(3), 1823), as `GAL_SPEC.md` interprets them:
the cosine is taken between the two twins' cross-entropy gradients (the update
directions eta * grad, in which eta cancels), one coefficient per trainable variable.

Everything here is a pure function of tensors. `gradient_agreement` reads no
variables, so it is compiled with XLA and runs under every `tf.distribute` strategy.
"""

import tensorflow as tf

UPDATE_RULES = ("agreement", "random", "all")

# Keeps the cosine finite when a gradient is exactly zero; such a pair gets 0.
_EPSILON = 1e-12


@tf.function(jit_compile=True, reduce_retracing=True)
def gradient_agreement(grads_a, grads_b):
    """Cosine similarity of two gradient lists, one coefficient per variable.

    Eq. (4): `agree_i = <g_A,i, g_B,i> / (||g_A,i|| ||g_B,i||)`, computed in float32
    whatever the gradients' dtype (mixed precision keeps the agreement math exact).

    Args:
        grads_a: list of dense gradient tensors of twin A, one per variable.
        grads_b: list of gradient tensors of twin B, same shapes and order.

    Returns:
        float32 tensor of shape `[len(grads_a)]` with values in [-1, 1]; a pair in
        which either gradient is zero gets 0.
    """
    coefficients = []
    for g_a, g_b in zip(grads_a, grads_b):
        g_a = tf.reshape(tf.cast(g_a, tf.float32), [-1])
        g_b = tf.reshape(tf.cast(g_b, tf.float32), [-1])
        dot = tf.reduce_sum(g_a * g_b)
        norms = tf.norm(g_a) * tf.norm(g_b)
        coefficients.append(dot / (norms + _EPSILON))
    return tf.stack(coefficients)


def agreement_gates(coefficients, tau):
    """Eq. (5): the gate `s_i = 1[agree_i >= tau]` as a boolean vector."""
    return coefficients >= tf.cast(tau, coefficients.dtype)


def random_gates(num_variables, probability, seed):
    """Gates of the `random` update rule (Table 4): each variable pair opens with
    probability p, one draw shared by both twins.

    The draw is stateless, so every replica of a distributed step draws the same
    gates from the same `seed` (a shape-[2] int tensor, e.g. `[run_seed, step]`).
    """
    draw = tf.random.stateless_uniform([num_variables], seed=seed)
    return draw < probability


def open_fractions(gates, sizes):
    """The agreement ratio two ways (Figure 1).

    Args:
        gates: boolean `[V]`, the gate of each variable.
        sizes: float32 `[V]`, the number of scalar parameters of each variable.

    Returns:
        `(variable_fraction, parameter_fraction)`: the share of variables whose gate
        is open, and the share of scalar parameters inside them.
    """
    open_ = tf.cast(gates, tf.float32)
    return tf.reduce_mean(open_), tf.reduce_sum(open_ * sizes) / tf.reduce_sum(sizes)
