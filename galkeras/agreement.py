"""Gradient agreement: the cosine of the twins' gradients and its gate.

Implements Eq. (4)-(5) of Yan et al., "Gradient Agreement Hinders the Memorization of
Noisy Labels" (Applied Sciences 2023, 13(3), 1823): the cosine is taken between the
two twins' cross-entropy gradients (the update directions eta * grad, in which eta
cancels). The paper's parameter pair ρ_i may be read as a whole tensor or as a
scalar, so the coefficient is taken at one of three granularities
(`GRANULARITIES`):

- `variable`: one cosine per trainable tensor (the default);
- `channel`: one cosine per output unit, over every axis but the last: a conv
  kernel `[kh, kw, c_in, c_out]` gives `c_out` cosines of `kh*kw*c_in` values, a
  dense kernel `[n_in, n_out]` gives `n_out`, a vector `[C]` (bias, BatchNorm
  γ/β) gives `C` cosines of 1-value vectors (sign agreement), a scalar one;
- `element`: one coefficient per scalar, the cosine of two 1-value vectors,
  `sign(g_A) * sign(g_B)` in {-1, 0, 1}. Any τ in (0, 1] then opens exactly the
  parameters whose two gradients have the same sign: the AND-mask of Parascandolo
  et al. 2020 ("Learning explanations that are hard to vary") with two
  environments.

A coefficient list holds, per variable, a tensor broadcastable to the variable's
shape: `[]` for `variable`, `[C]` (or `[]` for a scalar variable) for `channel`,
the variable's shape for `element`. Gates (`coefficient >= tau`) have the same
shapes, so `tf.where(gate, new, old)` selects per unit.

Everything here is a pure function of tensors. The coefficient functions read no
variables, so they are compiled with XLA and run under every `tf.distribute`
strategy; their math is float32 whatever the gradients' dtype.
"""

import tensorflow as tf

UPDATE_RULES = ("agreement", "random", "all")
GRANULARITIES = ("variable", "channel", "element")

# Keeps the per-variable cosine finite when a gradient is exactly zero; such a pair
# gets 0.
_EPSILON = 1e-12


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
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


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def channel_agreement(grads_a, grads_b):
    """Eq. (4) per output unit: one cosine per slice along the last axis.

    A variable of shape `[..., C]` gives `C` cosines, each over the `prod(...)`
    values of its slice; a vector `[C]` gives `C` cosines of 1-value vectors, i.e.
    `sign(g_A) * sign(g_B)`; a scalar gives one cosine of shape `[]`. There is no
    ε in the denominator, so that a 1-value cosine is the exact sign agreement
    however small the gradients; a slice in which either gradient is zero (or
    so small that its squared norm underflows float32, below about 1e-19) gets 0.

    Args:
        grads_a: list of dense gradient tensors of twin A, one per variable.
        grads_b: list of gradient tensors of twin B, same shapes and order.

    Returns:
        list of float32 tensors, `[C]` per variable of shape `[..., C]` and `[]`
        per scalar variable, with values in [-1, 1].
    """
    coefficients = []
    for g_a, g_b in zip(grads_a, grads_b):
        shape = g_a.shape[-1:]  # [C], or [] for a scalar
        units = shape[0] if shape.rank else 1
        g_a = tf.reshape(tf.cast(g_a, tf.float32), [-1, units])
        g_b = tf.reshape(tf.cast(g_b, tf.float32), [-1, units])
        dot = tf.reduce_sum(g_a * g_b, axis=0)
        norms = tf.norm(g_a, axis=0) * tf.norm(g_b, axis=0)
        coefficients.append(tf.reshape(tf.math.divide_no_nan(dot, norms), shape))
    return coefficients


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def element_agreement(grads_a, grads_b):
    """Eq. (4) per scalar: the cosine of two 1-value vectors, `sign(g_A) * sign(g_B)`.

    Returns:
        list of float32 tensors in {-1, 0, 1}, each of its variable's shape; an
        element in which either gradient is zero gets 0.
    """
    return [
        tf.sign(tf.cast(g_a, tf.float32)) * tf.sign(tf.cast(g_b, tf.float32))
        for g_a, g_b in zip(grads_a, grads_b)
    ]


def agreement_coefficients(grads_a, grads_b, granularity="variable"):
    """Eq. (4) at `granularity` (`GRANULARITIES`): a list of float32 coefficient
    tensors, one per variable, each broadcastable to its variable's shape."""
    if granularity == "variable":
        return tf.unstack(gradient_agreement(grads_a, grads_b))
    if granularity == "channel":
        return channel_agreement(grads_a, grads_b)
    if granularity == "element":
        return element_agreement(grads_a, grads_b)
    raise ValueError(
        f"granularity must be one of {GRANULARITIES}; got {granularity!r}."
    )


def agreement_gates(coefficients, tau):
    """Eq. (5): the gate `s_i = 1[agree_i >= tau]`, boolean, of the coefficients'
    shape; a list of coefficient tensors gives a list of gates."""
    if isinstance(coefficients, (list, tuple)):
        return [agreement_gates(c, tau) for c in coefficients]
    return coefficients >= tf.cast(tau, coefficients.dtype)


def unit_shapes(variable_shapes, granularity="variable"):
    """The shape of each variable's coefficients (and gates) at `granularity`."""
    if granularity == "variable":
        return [() for _ in variable_shapes]
    if granularity == "channel":
        return [tuple(s[-1:]) for s in variable_shapes]
    if granularity == "element":
        return [tuple(s) for s in variable_shapes]
    raise ValueError(
        f"granularity must be one of {GRANULARITIES}; got {granularity!r}."
    )


def random_gates(num_variables, probability, seed):
    """Gates of the `random` update rule (Table 4): each variable pair opens with
    probability p, one draw shared by both twins.

    The draw is stateless, so every replica of a distributed step draws the same
    gates from the same `seed` (a shape-[2] int tensor, e.g. `[run_seed, step]`).
    """
    draw = tf.random.stateless_uniform([num_variables], seed=seed)
    return draw < probability


def random_unit_gates(variable_shapes, probability, seed, granularity="variable"):
    """The `random` rule at `granularity`: each unit (variable, channel or
    element) opens with probability p, from one stateless draw over all units
    shared by both twins. At `variable` this is `random_gates`, unstacked.

    Returns:
        list of boolean gates, one per variable, of the `unit_shapes`.
    """
    shapes = unit_shapes(variable_shapes, granularity)
    if granularity == "variable":
        return tf.unstack(random_gates(len(shapes), probability, seed))
    counts = [_size(s) for s in shapes]
    draw = tf.random.stateless_uniform([sum(counts)], seed=seed) < probability
    return [tf.reshape(g, s) for g, s in zip(tf.split(draw, counts), shapes)]


def open_shares(gates):
    """Each variable's share of open units, float32 `[V]`.

    Every unit of one variable holds the same number of scalars (a whole tensor,
    a channel, an element), so this is also the share of the variable's scalar
    parameters whose gate is open.
    """
    return tf.stack([tf.reduce_mean(tf.cast(g, tf.float32)) for g in gates])


def open_fractions(gates, sizes):
    """The agreement ratio two ways (Figure 1).

    Args:
        gates: float32 or boolean `[V]`: each variable's gate, or its share of
            open scalars (`open_shares`).
        sizes: float32 `[V]`, the number of scalar parameters of each variable.

    Returns:
        `(variable_fraction, parameter_fraction)`: the mean over variables of each
        variable's open share (with one gate per variable, the share of variables
        whose gate is open), and the share of scalar parameters whose gate is open.
    """
    open_ = tf.cast(gates, tf.float32)
    return tf.reduce_mean(open_), tf.reduce_sum(open_ * sizes) / tf.reduce_sum(sizes)


def _size(shape):
    size = 1
    for d in shape:
        size *= int(d)
    return size
