"""`GatedUpdate`: one network's optimizer step, with gates, verdicts and loss scale.

GAL updates a twin only where its gate is open (Eq. 5), skips a step that went
non-finite, and under float16 scales its losses so that both twins skip an
overflowing step together. `GatedUpdate` wraps applying gradients to one network
the way Keras' `LossScaleOptimizer` wraps an `inner_optimizer`, so that the
method's train step only says which gates are open. `NonFiniteStop` holds back
every step from the first non-finite one on (`on_nonfinite="stop"`), so that the
run can be stopped later, where Python reads the device anyway.
"""

import keras
import tensorflow as tf

MASKED_UPDATES = ("skip", "zero_grad")


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient (`on_nonfinite="stop"`).

    Attributes:
        epoch: 1-based epoch of the step.
        step: 1-based step within that epoch.
        global_step: 1-based step of the run.
        networks: names of the networks at fault.
    """

    def __init__(self, epoch, step, steps_per_epoch, global_step, networks):
        self.epoch, self.step, self.global_step = epoch, step, global_step
        self.networks = networks
        super().__init__(
            f"Non-finite loss or gradient in {' and '.join(networks)} at epoch "
            f"{epoch}, step {step} of {steps_per_epoch} (step {global_step} of the "
            "run). Training stopped: neither that step nor any after it was "
            "applied, so every network keeps its weights from before it. Usual "
            "causes: a learning rate too high, or inputs with inf/NaN. To skip such "
            "steps instead, use on_nonfinite='skip_step' (--on_nonfinite=skip_step)."
        )


def optimizer_slots(optimizer, variables):
    """For each variable, the optimizer variables created from it.

    Keras names a slot `{variable.path with '/' -> '_'}_{slot}` (momentum, Adam's
    moments, ...). This recovers that map for any Keras optimizer, so that the
    `skip` update can keep a gated-off variable's slots bit-identical.
    """
    keys = [v.path.replace("/", "_") + "_" for v in variables]
    if len(set(keys)) != len(keys):
        raise ValueError(
            "Two trainable variables of one twin share a path; GAL needs unique "
            "variable paths to find their optimizer slots. Give the layers "
            "unique names."
        )
    slots = [[] for _ in variables]
    for slot in optimizer.variables:
        best = None
        for i, key in enumerate(keys):
            if (
                slot.name.startswith(key)
                and tuple(slot.shape) == tuple(variables[i].shape)
                and (best is None or len(key) > len(keys[best]))
            ):
                best = i
        if best is not None:
            slots[best].append(slot)
    return slots


def all_finite(tensors):
    """A scalar bool: every element of every tensor is finite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def all_replicas_finite(finite):
    """`finite` and-ed over replicas, so that every replica takes the same path."""
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1:
        return finite
    # ReduceOp has no MIN: count the replicas where it is false.
    bad = replica.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32)
    )
    return bad < 0.5


def record_nonfinite(faults, names, steps, networks):
    """The `skip_step` verdict of a step: fault-free on every replica.

    Args:
        faults: `{network name: local "fault-free" scalar bool}`.
        names: every network name, in the order of the bits of `networks`.
        steps: int32 variable counting the steps with a fault.
        networks: int32 variable, bit mask of the networks at fault in the
            latest such step.

    Returns:
        A scalar bool, the same on every replica: no network is at fault.
    """
    present = [n for n in names if n in faults]
    ok = all_replicas_finite(tf.stack([faults[n] for n in present]))
    bits = tf.add_n(
        [tf.where(ok[i], 0, 1 << names.index(name)) for i, name in enumerate(present)]
    )
    bad = bits > 0
    steps.assign_add(tf.cast(bad, tf.int32))
    networks.assign(tf.where(bad, bits, networks))
    return tf.logical_not(bad)


class NonFiniteStop:
    """`on_nonfinite="stop"` without reading the device after every step.

    The first step of a `fit` with a fault (`record_nonfinite`), and every step
    after it, is held back in the graph as a `skip_step` step is: weights,
    optimizer slots, iteration counters and BatchNorm statistics keep their
    values. The first faulty step and its networks are kept in two variables,
    which `check` reads where Python reads the device anyway (a logged step, a
    checkpoint, the end of an epoch) to raise `NonFiniteError` naming that step.
    A late check therefore never finds NaN weights, and no checkpoint is ever
    written past the fault. Disabled (`skip_step`), every method is the identity
    and no variable is made.

    Plain `tf.Variable`s, not Keras weights, and not in a run's checkpoint: a
    fit starts without a fault (`reset`), and a run with one saves nothing more.

    Args:
        strategy: the model's `tf.distribute` strategy.
        names: every network name, in the order of the bits of the method's
            `nonfinite_networks`.
        enabled: bool, whether the method's `on_nonfinite` is `"stop"`.
    """

    def __init__(self, strategy, names, enabled):
        self.names = tuple(names)
        self.enabled = bool(enabled)
        self.steps_per_epoch = 1
        if not self.enabled:
            return
        with strategy.scope():
            # 1-based run step of the fit's first faulty step; 0: none yet.
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                name="first_nonfinite_step",
            )
            self.networks = tf.Variable(
                0,
                dtype=tf.int32,
                trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                name="first_nonfinite_networks",
            )

    def reset(self, steps_per_epoch):
        """A new `fit`: no fault yet. `steps_per_epoch` is for the message."""
        self.steps_per_epoch = int(steps_per_epoch)
        if self.enabled:
            self.step.assign(0)
            self.networks.assign(0)

    def hold(self, step_ok, run_step, networks):
        """The verdict of a step in the graph: False from the first faulty step
        of the fit on, which it records.

        Args:
            step_ok: scalar bool, `record_nonfinite`'s verdict of this step.
            run_step: the steps of the run done before this one.
            networks: the bit mask `record_nonfinite` wrote for this step.
        """
        if not self.enabled:
            return step_ok
        clean_so_far = tf.equal(self.step, 0)
        first = tf.logical_and(clean_so_far, tf.logical_not(step_ok))
        step = tf.cast(run_step, tf.int64) + 1
        self.step.assign(tf.where(first, step, self.step))
        self.networks.assign(tf.where(first, networks, self.networks))
        return tf.logical_and(clean_so_far, step_ok)

    def check(self):
        """Raises `NonFiniteError` if a step of this fit had a fault: one read
        of the device, so callers check only where they read it anyway."""
        if not self.enabled:
            return
        step = int(self.step.numpy())
        if not step:
            return
        bits = int(self.networks.numpy())
        steps = self.steps_per_epoch
        raise NonFiniteError(
            epoch=(step - 1) // steps + 1,
            step=(step - 1) % steps + 1,
            steps_per_epoch=steps,
            global_step=step,
            networks=[n for i, n in enumerate(self.names) if bits >> i & 1],
        )


class DynamicLossScale:
    """Dynamic loss scaling for float16 (Micikevicius et al., 2018), as Keras'
    `LossScaleOptimizer` does it, but kept outside the optimizers so that one
    scale can serve two networks and a non-finite step skips both.

    The loss is multiplied by the scale before differentiation and the gradients
    divided by it. A step with a non-finite gradient halves the scale; 2,000
    finite steps in a row double it. Without float16 every method is the
    identity and no variable is made.

    Args:
        model: the `keras.Model` whose weights hold the state (so checkpoints and
            `.keras` files carry it).
        name: prefix of the state variables.
        enabled: bool, whether the networks compute in float16.
        initial: the starting scale.
        growth_steps: finite steps between doublings.
    """

    def __init__(self, model, name, enabled, initial=2.0**15, growth_steps=2000):
        self.enabled = bool(enabled)
        self.growth_steps = growth_steps
        if not self.enabled:
            return

        def state(suffix, dtype, initial_value):
            return model.add_weight(
                shape=(),
                dtype=dtype,
                initializer=keras.initializers.Constant(initial_value),
                trainable=False,
                aggregation="only_first_replica",
                name=f"{name}_{suffix}",
            )

        self.value = state("loss_scale", "float32", initial)
        self.good_steps = state("good_steps", "int32", 0)
        self.skipped_steps = state("skipped_steps", "int32", 0)

    @property
    def variables(self):
        if not self.enabled:
            return []
        return [self.value, self.good_steps, self.skipped_steps]

    def scale(self, loss):
        return loss * self.value if self.enabled else loss

    def unscale(self, grads):
        if not self.enabled:
            return grads
        return [g / tf.cast(self.value, g.dtype) for g in grads]

    def update(self, finite):
        """Records a step whose gradients were `finite` (a bool tensor, the same
        on every replica) and returns it."""
        good = tf.where(finite, self.good_steps + 1, 0)
        grow = good >= self.growth_steps
        new_value = tf.where(
            finite,
            tf.where(grow, self.value * 2.0, self.value),
            tf.maximum(self.value / 2.0, 1.0),
        )
        self.value.assign(new_value)
        self.good_steps.assign(tf.where(grow, 0, good))
        self.skipped_steps.assign_add(tf.cast(tf.logical_not(finite), tf.int32))
        return finite

    def check(self, grads, global_grads=False):
        """The `finite` verdict of a step's gradients, recorded in the scale; None
        without float16.

        Args:
            grads: every gradient the verdict covers (both twins' for the twins).
            global_grads: True if `grads` are already the same on every replica
                (all-reduced), so no further reduction is needed.
        """
        if not self.enabled:
            return None
        finite = all_finite(grads)
        return self.update(finite if global_grads else all_replicas_finite(finite))

    def fault_free(self, loss, grads):
        """A scalar bool: `loss` is finite and, unless float16 loss scaling owns
        gradient overflow, so is every gradient (the `skip_step` fault test)."""
        ok = tf.reduce_all(tf.math.is_finite(loss))
        return ok if self.enabled else ok & all_finite(grads)


class GatedUpdate:
    """Applies gradients to one network where its gates are open.

    Gates have any granularity (`galkeras.agreement.GRANULARITIES`): one boolean
    tensor per variable, broadcastable to it (`[]` for a whole variable, `[C]`
    for its output channels, the variable's shape for its elements).

    - `skip` (the paper's "only update agreed parameters"): the optimizer steps,
      then every gated-off element of a variable and the same element of each of
      its optimizer slots (momentum, Adam moments, ...) get their values from
      before the step back, with one select per tensor. They stay bit-identical
      whatever the optimizer does, weight decay included.
    - `zero_grad`: the gradient is multiplied by the gate and the optimizer steps
      as usual, so momentum and weight decay still move gated-off elements.

    Two verdicts close every gate of a step: `step_ok` (a non-finite step, under
    either `on_nonfinite`: also the optimizer's iteration counter stays, so the
    learning rate schedule does not move) and `finite` (float16: the loss
    scale's verdict, `DynamicLossScale.check`). Both are scalar bools, the same
    on every replica.

    Args:
        optimizer: the network's built `keras.optimizers.Optimizer`.
        variables: the network's trainable variables, in gradient order.
        loss_scale: the network's `DynamicLossScale` (the twins share one).
        masked_update: `"skip"` or `"zero_grad"` (`MASKED_UPDATES`).

    Example:
    ```python
    update = GatedUpdate(optimizer, net.trainable_variables, loss_scale)
    update.apply(grads, gates=[g >= 0.4 for g in coefficients])
    ```
    """

    def __init__(self, optimizer, variables, loss_scale, masked_update="skip"):
        if masked_update not in MASKED_UPDATES:
            raise ValueError(
                f"masked_update must be one of {MASKED_UPDATES}; got {masked_update!r}."
            )
        self.optimizer = optimizer
        self.variables = list(variables)
        self.loss_scale = loss_scale
        self.masked_update = masked_update
        self.slots = optimizer_slots(optimizer, self.variables)

    def apply(self, grads, gates=None, step_ok=None, finite=None):
        """One optimizer step of `grads` where the gates are open.

        Args:
            grads: list of gradients, one per variable.
            gates: None (every gate open) or a list of boolean gates, one per
                variable, each broadcastable to it.
            step_ok: None or a scalar bool; False leaves the step out entirely.
            finite: None or a scalar bool; False closes every gate.
        """
        if gates is not None and self.masked_update == "zero_grad":
            grads = [g * tf.cast(s, g.dtype) for g, s in zip(grads, gates)]
            gates = None
        for verdict in (finite, step_ok):
            if verdict is not None:
                gates = (
                    [verdict] * len(self.variables)
                    if gates is None
                    else [tf.logical_and(s, verdict) for s in gates]
                )
        if step_ok is None:
            if gates is None:
                self.optimizer.apply(grads, self.variables)
            else:
                self._select_apply(grads, gates)
            return
        # A skipped step may hold NaN: keep it out of the optimizer's arithmetic,
        # whose result is discarded anyway.
        grads = [tf.where(step_ok, g, tf.zeros_like(g)) for g in grads]
        iterations = _tf_variable(self.optimizer.iterations)
        before = tf.identity(iterations)
        self._select_apply(grads, gates)
        iterations.assign(tf.where(step_ok, iterations.read_value(), before))

    def _select_apply(self, grads, gates):
        """The `skip` update: the optimizer steps, then `where(gate, new, old)`
        on every variable and slot."""
        if self.loss_scale.enabled:
            # A closed gate may hide a non-finite gradient (float16): keep it out
            # of the optimizer's arithmetic, whose result is discarded anyway.
            grads = [tf.where(s, g, tf.zeros_like(g)) for g, s in zip(grads, gates)]
        targets, saved, target_gates = [], [], []
        for v, var_slots, gate in zip(self.variables, self.slots, gates):
            for t in (v, *var_slots):
                targets.append(_tf_variable(t))
                saved.append(tf.identity(t.value))
                target_gates.append(gate)
        self.optimizer.apply(grads, self.variables)

        def restore(distribution, targets, saved, gates):
            def select(var, old, gate):
                return var.assign(tf.where(gate, var.read_value(), old))

            for var, old, gate in zip(targets, saved, gates):
                distribution.extended.update(var, select, args=(old, gate), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            restore, tf.distribute.get_strategy(), targets, saved, target_gates
        )


def _tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v
