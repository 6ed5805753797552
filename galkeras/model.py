"""`GAL`: the Gradient Agreement Learning model, a subclassed `keras.Model`.

It holds the twins θA, θB and the student θC, and drives the whole method from
inside `fit`: warm-up, the warm-up switch, gradient-agreement updating with CDAS
batches, and θC's pseudo-label supervision with a table refreshed every epoch.
"""

import keras
import numpy as np
import tensorflow as tf

from galkeras import agreement, sampling
from galkeras.distill import pseudo_label_loss
from galkeras.gal_driver import GALDriver
from galkeras.gated_update import (  # noqa: F401  (NonFiniteError re-exported)
    MASKED_UPDATES,
    DynamicLossScale,
    GatedUpdate,
    NonFiniteError,
    NonFiniteStop,
    record_nonfinite,
)
from galkeras.methods.base import (
    StopOnNonFinite,
    fit_from_step,
    training_set_of,
    update_test_trackers,
)
from galkeras.network_pass import Inference, NetworkPass, resolve_jit_compile
from galkeras.teacher import PseudoLabelTable

ON_NONFINITE = ("stop", "skip_step")
# When θC starts training: with the twins from the first epoch, or at the split.
STUDENT_STARTS = ("first_epoch", "split")
WARMUP, AGREEMENT = "warmup", "agreement"
# Bits of `GAL.nonfinite_networks`, in this order.
NETWORK_NAMES = ("twin_a", "twin_b", "student")

# What `GAL.last_step` holds after every train step.
LAST_STEP_KEYS = (
    "twin_a_loss",
    "twin_b_loss",
    "student_loss",
    "agreement_ratio",
    "agreement_param_ratio",
    "updated_ratio",
    "agreement_per_variable",
)


def _clone_optimizer(optimizer):
    return optimizer.__class__.from_config(optimizer.get_config())


def _tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v


def _global_mean(grads):
    """The mean of `grads` over replicas (the gradients of the global batch)."""
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1:
        return grads
    return replica.all_reduce(tf.distribute.ReduceOp.MEAN, grads)


def _agreement_diagnostics(coefficients, gates):
    """Per variable: the mean coefficient and the share of open scalars."""
    means = tf.stack([tf.reduce_mean(c) for c in coefficients])
    return means, agreement.open_shares(gates)


@keras.saving.register_keras_serializable(package="galkeras")
class GAL(keras.Model):
    """Gradient Agreement Learning (Yan et al., Applied Sciences 2023).

    Two twins θA and θB with identical initial weights train with cross entropy on
    the annotated labels. During the first `warmup_epochs` epochs only θA trains;
    then θB becomes an exact copy of θA (weights, non-trainable state and optimizer
    slots). From there on, each step feeds the twins different batches of equal
    class distribution (CDAS, §3.1), computes the cosine of their gradients for
    every trainable variable, channel or element (`agreement_granularity`, Eq. 4)
    and updates only the parameters whose cosine reaches `tau` (Eq. 5). The
    student θC learns at every step from the twins' joint prediction with
    thresholded cross entropy plus KL (Eq. 9-11); θC is the model that `predict`
    serves.

    Args:
        twin_a: `keras.Model` mapping images to logits (θA).
        twin_b: `keras.Model` of the same architecture (θB). It is overwritten
            with θA's weights at construction, so both start identical.
        student: `keras.Model` mapping images to logits (θC); any architecture.
        warmup_epochs: int W, epochs of plain cross entropy on θA alone.
        tau: float in [-1, 1], the agreement threshold τ (paper: 0.4).
        epsilon: float in [0, 1), the pseudo-label confidence threshold ε (0.8).
        update_rule: `"agreement"` (default), `"random"` (each unit of
            `agreement_granularity` updated with probability
            `random_update_prob`, one draw for both twins) or `"all"` (no gating;
            the agreement is still measured).
        random_update_prob: p of the `random` rule (paper: 0.8/0.5/0.2/0.6).
        masked_update: `"skip"` (default: a gated-off variable, channel or
            element and the same part of its optimizer slots do not move at all)
            or `"zero_grad"` (its gradient is zeroed and the optimizer steps as
            usual, so momentum and weight decay still act).
        train_student: bool; `False` trains the twins alone (a CE baseline when
            `warmup_epochs` equals the number of epochs).
        student_start: `"first_epoch"` (default: θC learns from the twins'
            table from the first epoch, θA's alone during the warm-up) or
            `"split"` (θC waits for the twins' split, then learns from their
            joint prediction; its learning-rate schedule keeps the run's
            epochs). The paper does not say which (§3.3).
        seed: int, seed of the `random` rule's draws.
        on_nonfinite: what a step with a non-finite loss or gradient (NaN or
            inf; under float16 a non-finite *loss*, since gradient overflow is
            the loss scale's business) does. `"skip_step"`: the step is not
            applied to any of the three networks (weights and optimizer slots
            bit-identical) and is counted in `nonfinite_steps`. `"stop"`
            (default): that step and every later one are held back the same
            way, and `fit` raises `NonFiniteError` naming the epoch, the step
            and the network at its next check: the end of the epoch, or a
            logged or checkpointed step (`galkeras.gated_update.NonFiniteStop`),
            so that no step reads the device to look.
        agreement_granularity: what one coefficient of Eq. (4) covers:
            `"variable"` (default: one cosine per trainable tensor), `"channel"`
            (one per output unit, over every axis but the last) or `"element"`
            (one per scalar, `sign(g_A) * sign(g_B)`: any `tau` in (0, 1] then
            opens the parameters whose gradients have the same sign). See
            `galkeras.agreement`.

    Example:
    ```python
    make = lambda name: galkeras.backbones.small_cnn((8, 8, 1), 10, [0], [1], name=name)
    gal = galkeras.GAL(make("twin_a"), make("twin_b"), make("student"), warmup_epochs=4)
    gal.compile(optimizer=galkeras.optimizers.SGD(0.05))
    gal.fit(x_train, noisy_labels, batch_size=64, epochs=10,
            validation_data=(x_test, y_test))
    probabilities = gal.predict(x_test)  # θC's class probabilities
    ```

    Reference: Yan, Tian, Jiang, Chen, "Gradient Agreement Hinders the
    Memorization of Noisy Labels", Applied Sciences 13(3):1823, 2023.
    """

    NETWORKS = NETWORK_NAMES
    REPORTED = "student"

    def __init__(
        self,
        twin_a,
        twin_b,
        student,
        warmup_epochs,
        tau=0.4,
        epsilon=0.8,
        update_rule="agreement",
        random_update_prob=0.8,
        masked_update="skip",
        train_student=True,
        seed=0,
        on_nonfinite="stop",
        agreement_granularity="variable",
        student_start="first_epoch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}; got {on_nonfinite!r}."
            )
        if update_rule not in agreement.UPDATE_RULES:
            raise ValueError(
                f"update_rule must be one of {agreement.UPDATE_RULES}; "
                f"got {update_rule!r}."
            )
        if masked_update not in MASKED_UPDATES:
            raise ValueError(
                f"masked_update must be one of {MASKED_UPDATES}; got {masked_update!r}."
            )
        if agreement_granularity not in agreement.GRANULARITIES:
            raise ValueError(
                f"agreement_granularity must be one of {agreement.GRANULARITIES}; "
                f"got {agreement_granularity!r}."
            )
        if student_start not in STUDENT_STARTS:
            raise ValueError(
                f"student_start must be one of {STUDENT_STARTS}; got {student_start!r}."
            )
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [-1, 1]; got {tau}.")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1); got {epsilon}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0; got {warmup_epochs}.")
        # === Layers ===
        self.twin_a = twin_a
        self.twin_b = twin_b
        self.student = student
        # === Config ===
        self.warmup_epochs = int(warmup_epochs)
        self.tau = float(tau)
        self.epsilon = float(epsilon)
        self.update_rule = update_rule
        self.random_update_prob = float(random_update_prob)
        self.masked_update = masked_update
        self.train_student = bool(train_student)
        self.student_start = student_start
        self.seed = int(seed)
        self.on_nonfinite = on_nonfinite
        self.agreement_granularity = agreement_granularity
        # === State ===
        a_shapes = [tuple(v.shape) for v in twin_a.weights]
        if a_shapes != [tuple(v.shape) for v in twin_b.weights]:
            raise ValueError("twin_a and twin_b must have the same architecture.")
        twin_b.set_weights(twin_a.get_weights())
        # 1 once θB has been split off θA at the warm-up switch; saved with the
        # weights so that a resumed run never copies θA over a trained θB again.
        self.twins_split = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            name="twins_split",
        )
        # float16 needs loss scaling (bfloat16 has float32's range and does not).
        self.loss_scaling = twin_a.dtype_policy.compute_dtype == "float16"
        # The twins share one scale, so that both skip an overflowing step.
        self.twins_loss_scale = DynamicLossScale(self, "twins", self.loss_scaling)
        self.student_loss_scale = DynamicLossScale(self, "student", self.loss_scaling)
        # Steps with a non-finite loss or gradient, and a bit mask (NETWORK_NAMES)
        # of the networks at fault in the latest one.
        self.nonfinite_steps = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="nonfinite_steps",
        )
        self.nonfinite_networks = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="nonfinite_networks",
        )
        # `on_nonfinite="stop"`: the first faulty step of a fit, held back.
        self.nonfinite_stop = NonFiniteStop(
            self.distribute_strategy, NETWORK_NAMES, on_nonfinite == "stop"
        )
        self.phase = WARMUP
        # The run step after the latest execution of `fit`, as Python knows it
        # without reading `run_step` (`methods.base.FitCallbacks` sets it).
        self.host_step = 0
        # Steps of the run done so far (a resumed run included): advanced by the
        # train step itself, and saved by checkpoints (logging and checkpoints
        # act on its mirror `host_step`, which needs no read). A plain
        # `tf.Variable`, not a Keras weight, so that `.keras` files keep their
        # layout; a run's checkpoint holds it (`checkpointing.RunCheckpoint`).
        with self.distribute_strategy.scope():
            self.run_step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                name="run_step",
            )
        # θC's teacher: the twins' joint prediction on every training sample.
        self.teacher = PseudoLabelTable(self.distribute_strategy, epsilon)
        # One `GatedUpdate` per network, made once the optimizers are built.
        self._gated_updates = None
        self._slots = None
        # XLA's pieces (see `compile`).
        self.jit_passes, self._passes, self._infer = False, {}, Inference(False)
        self._variable_sizes = tf.constant(
            [float(np.prod(v.shape)) for v in twin_a.trainable_variables], tf.float32
        )
        # === Metrics ===
        train_keys = (
            "loss",
            "twin_a_loss",
            "twin_b_loss",
            "agreement",
            "agreement_ratio",
            "agreement_param_ratio",
            "updated_ratio",
        )
        # Tracker names equal their log keys, so callbacks such as EarlyStopping
        # infer the direction of "val_student_accuracy" by themselves.
        self._train_trackers = {k: keras.metrics.Mean(name=k) for k in train_keys}
        for key in ("twin_a_accuracy", "twin_b_accuracy"):
            self._train_trackers[key] = keras.metrics.SparseCategoricalAccuracy(
                name=key
            )
        self._test_trackers = {"loss": keras.metrics.Mean(name="loss")}
        for key in ("twin_a", "twin_b", "joint", "student"):
            self._test_trackers[f"{key}_accuracy"] = (
                keras.metrics.SparseCategoricalAccuracy(name=f"{key}_accuracy")
            )
        # Per-variable share of steps with an open gate (per-layer diagnostics).
        # Not in `metrics`: Keras resets those before validation, and this one is
        # read at the end of the epoch. The fit driver resets it every epoch.
        num_vars = len(twin_a.trainable_variables)
        self.variable_open_fraction = VectorMean(
            num_vars, name="variable_open_fraction"
        )
        # The latest step's own values (not epoch means), for per-step logging
        # (Figure 1). Agreement values are the same on every replica; losses are
        # the first replica's.
        self.last_step = {
            key: self.add_weight(
                shape=(num_vars,) if key == "agreement_per_variable" else (),
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
                name=f"last_{key}",
            )
            for key in LAST_STEP_KEYS
        }
        self.built = all(m.built for m in (twin_a, twin_b, student))

    @classmethod
    def from_backbone(cls, backbone_fn, student_fn=None, **kwargs):
        """Builds θA and θB with one factory (`backbone_fn(name=...)`), and θC with
        `student_fn` (default: the same factory)."""
        student_fn = student_fn or backbone_fn
        return cls(
            backbone_fn(name="twin_a"),
            backbone_fn(name="twin_b"),
            student_fn(name="student"),
            **kwargs,
        )

    def build(self, input_shape=None):
        for net in (self.twin_a, self.twin_b, self.student):
            if not net.built:
                net.build(input_shape)
        self.built = True

    def call(self, inputs, training=False):
        """θC's logits: the student is the model GAL reports and serves."""
        return self.student(inputs, training=training)

    # --------------------------------------------------------------- compile
    def compile(
        self,
        optimizer="sgd",
        student_optimizer=None,
        twin_b_optimizer=None,
        **kwargs,
    ):
        """Configures the three optimizers.

        Args:
            optimizer: θA's optimizer. θB gets an exact clone of it (their slots
                are made identical at the warm-up switch).
            student_optimizer: θC's optimizer; a clone of `optimizer` if omitted.
            twin_b_optimizer: θB's optimizer; a clone of `optimizer` if omitted.
            **kwargs: `keras.Model.compile` arguments such as `jit_compile` and
                `steps_per_execution`. Losses and metrics are GAL's own.
                `jit_compile` (`"auto"`, True, False) compiles each network's
                forward and backward pass with XLA under every strategy
                (`galkeras.network_pass`), and the whole step where Keras can
                (no `tf.distribute` strategy); `"auto"` is XLA on a GPU only.
                `steps_per_execution=k` runs k train steps per call from
                Python, with the same results: it must divide the steps of an
                epoch, and the `every_n_steps` of `RunLogger` and
                `CheckpointCallback`, which act between calls.
        """
        for arg in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"GAL.compile does not take `{arg}`: GAL's losses are fixed by "
                    "the method (CE for the twins, Eq. 9-11 for the student)."
                )
        optimizer = keras.optimizers.get(optimizer)
        whole_step, self.jit_passes = resolve_jit_compile(
            kwargs.get("jit_compile", "auto"), self._distribute_strategy
        )
        self._passes, self._infer = {}, Inference(self.jit_passes)
        super().compile(optimizer=optimizer, **{**kwargs, "jit_compile": whole_step})
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # Keras wraps the optimizer under mixed_float16; GAL scales its losses
            # itself (DynamicLossScale) so that both twins skip a step together.
            self.optimizer = self.optimizer.inner_optimizer
        self.optimizer_b = (
            keras.optimizers.get(twin_b_optimizer)
            if (twin_b_optimizer is not None)
            else _clone_optimizer(optimizer)
        )
        self.student_optimizer = (
            keras.optimizers.get(student_optimizer)
            if (student_optimizer is not None)
            else _clone_optimizer(optimizer)
        )
        self._compile_config = keras.src.saving.serialization_lib.SerializableDict(
            optimizer=optimizer,
            student_optimizer=self.student_optimizer,
            twin_b_optimizer=self.optimizer_b,
            **kwargs,
        )
        self._gated_updates = None
        self._slots = None

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self._build_optimizers()

    def _build_optimizers(self):
        """Builds each optimizer on its own network's variables only."""
        pairs = (
            (self.optimizer, self.twin_a),
            (self.optimizer_b, self.twin_b),
            (self.student_optimizer, self.student),
        )
        with self.distribute_strategy.scope():
            for opt, net in pairs:
                if not opt.built:
                    opt.build(net.trainable_variables)
        if self._gated_updates is None:
            # The twins share one loss scale; θC has its own.
            scales = (
                self.twins_loss_scale,
                self.twins_loss_scale,
                self.student_loss_scale,
            )
            self._gated_updates = tuple(
                GatedUpdate(opt, net.trainable_variables, scale, self.masked_update)
                for (opt, net), scale in zip(pairs, scales)
            )
            # Keras tracks these slot lists among GAL's own weights, and `.keras`
            # files written before `GatedUpdate` existed hold them there: keep
            # the same weights, in the same order, so those files still load.
            self._slots = tuple(update.slots for update in self._gated_updates)

    @property
    def _update_a(self):
        return self._gated_updates[0]

    @property
    def _update_b(self):
        return self._gated_updates[1]

    @property
    def _update_student(self):
        return self._gated_updates[2]

    @property
    def global_step(self):
        """The run step as a Python int (what checkpoints and logs are keyed by)."""
        return int(self.run_step.numpy())

    @property
    def pseudo_labels(self):
        """The teacher's `[N, K]` table of `p_joint` (None before it is made)."""
        return self.teacher.table

    @property
    def pseudo_label_stats(self):
        """The latest table's statistics (`teacher.pseudo_label_statistics`)."""
        return self.teacher.statistics

    @property
    def metrics(self):
        return [
            *self._train_trackers.values(),
            *self._test_trackers.values(),
        ]

    # ---------------------------------------------------------- phase switch
    def enter_epoch(self, epoch):
        """Sets the phase for `epoch`; at the first agreement epoch, splits θB off θA.

        Called by `fit` at the start of every epoch. θB becomes an exact copy of
        θA in weights, non-trainable state (BatchNorm statistics) and optimizer
        state (slots and iteration count), then trains on its own (§4.4).
        """
        phase = AGREEMENT if epoch >= self.warmup_epochs else WARMUP
        if phase == AGREEMENT and int(self.twins_split.numpy()) == 0:
            self.copy_twin_a_to_b()
        if phase != self.phase:
            self.phase = phase
            self.make_train_function(force=True)

    @property
    def trains_student_now(self):
        """Whether this phase's steps train θC."""
        return self.train_student and (
            self.student_start == "first_epoch" or self.phase != WARMUP
        )

    def copy_twin_a_to_b(self):
        """θB := θA, weights and optimizer state, bit for bit. A θC that starts
        at the split takes θA's step count, so that its learning-rate schedule
        keeps the run's epochs."""
        self._build_optimizers()
        for source, target in zip(self.twin_a.weights, self.twin_b.weights):
            target.assign(source)
        if len(self.optimizer.variables) != len(self.optimizer_b.variables):
            raise ValueError("twin_a's and twin_b's optimizers differ in structure.")
        for source, target in zip(self.optimizer.variables, self.optimizer_b.variables):
            target.assign(source)
        if self.student_start == "split":
            self.student_optimizer.iterations.assign(self.optimizer.iterations)
        self.twins_split.assign(1)

    # ------------------------------------------------------------ train step
    def train_step(self, data):
        # Every network's loss and gradients first, then the updates, so that a
        # non-finite value anywhere can hold back the whole step. The forward
        # passes move BatchNorm statistics: keep the old ones.
        nets = [self.twin_a, self.student]
        if self.phase != WARMUP:
            nets.append(self.twin_b)
        saved = [
            (_tf_variable(v), tf.identity(v.value))
            for net in nets
            for v in net.non_trainable_variables
        ]
        if self.phase == WARMUP:
            faults, updates = self._warmup_step(data)
        else:
            faults, updates = self._agreement_step(data)
        if self.trains_student_now:
            fault, update = self._student_step(data["image_a"], data["id_a"])
            faults, updates = {**faults, **fault}, [*updates, update]
        step_ok = record_nonfinite(
            faults, NETWORK_NAMES, self.nonfinite_steps, self.nonfinite_networks
        )
        # `stop`: from the first faulty step on, nothing moves until the check.
        step_ok = self.nonfinite_stop.hold(
            step_ok, self.run_step, self.nonfinite_networks
        )
        for update in updates:
            update(step_ok)
        for variable, old in saved:
            variable.assign(tf.where(step_ok, variable.read_value(), old))
        self.run_step.assign_add(1)
        logs = self._logs(
            {
                **self._train_trackers,
                "nonfinite_steps": tf.cast(self.nonfinite_steps, tf.float32),
            }
        )
        # The epoch's table statistics, known since its refresh: every step's
        # logs carry them, so no callback has to add them.
        return {**logs, **self._logs(self.teacher.logs())}

    def _logs(self, values):
        """`values` (trackers, or tensors) as the step's logs. Under multi-worker
        training Keras averages them with `reduce(MEAN, axis=0)`, which needs an
        axis: each scalar then travels as a `[1]` vector."""
        logs = {
            name: v.result() if isinstance(v, keras.metrics.Metric) else v
            for name, v in values.items()
        }
        if self.distribute_strategy.extended._in_multi_worker_mode():
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _cross_entropy_gradients(self, net, images, labels, tracker_prefix):
        """`(loss, gradients)`: `net`'s mean CE on its local batch and its local
        gradients (under float16, of the scaled loss, unscaled)."""
        scale = self.twins_loss_scale
        losses, _, grads, logits = self._network_pass(tracker_prefix)(
            {"labels": labels}, {tracker_prefix: images}, self._loss_factor(scale)
        )
        loss, logits = losses[tracker_prefix], logits[tracker_prefix]
        grads = scale.unscale(grads[tracker_prefix])
        self._train_trackers[f"{tracker_prefix}_loss"].update_state(loss)
        self.last_step[f"{tracker_prefix}_loss"].assign(loss)
        self._train_trackers[f"{tracker_prefix}_accuracy"].update_state(labels, logits)
        return loss, grads

    def _network_pass(self, name):
        """The `NetworkPass` of network `name`: the twins' cross entropy, θC's
        `L_c + L_d` (Eq. 9-11) against the table's rows in `inputs["teacher"]`."""
        if name not in self._passes:
            loss_fn = self._student_loss if name == "student" else _mean_ce
            self._passes[name] = NetworkPass(
                {name: getattr(self, name)}, loss_fn, self.jit_passes, name=name
            )
        return self._passes[name]

    def _student_loss(self, logits, inputs):
        loss = pseudo_label_loss(inputs["teacher"], logits["student"], self.epsilon)
        return {"student": keras.ops.mean(loss)}, None

    def check_xla(self, image_shape, batch_size=2):
        """Raises ValueError, naming the network, when `jit_compile` asks for XLA
        and XLA cannot compile a network's pass (nothing runs)."""
        images = tf.zeros([batch_size, *image_shape], tf.float32)
        classes = self.student.output_shape[-1]
        for name in NETWORK_NAMES:
            inputs = (
                {"teacher": tf.zeros([batch_size, classes], tf.float32)}
                if name == "student"
                else {"labels": tf.zeros([batch_size], tf.int64)}
            )
            self._network_pass(name).check_compiles(inputs, {name: images})

    def _loss_factor(self, scale):
        """What each loss is multiplied by before differentiation: the optimizer
        sums gradients over replicas, so each replica contributes its mean
        divided by the replica count; under float16, times the loss scale."""
        return scale.scale(1.0 / self.distribute_strategy.num_replicas_in_sync)

    def _warmup_step(self, data):
        """Phase 1: plain cross entropy on θA alone.

        Returns `({"twin_a": fault-free}, [update])`, `update(step_ok)` applying
        the step (see `train_step`)."""
        loss, grads = self._cross_entropy_gradients(
            self.twin_a, data["image_a"], data["label_a"], "twin_a"
        )

        def update(step_ok):
            finite = self.twins_loss_scale.check(grads)
            self._update_a.apply(grads, step_ok=step_ok, finite=finite)

        return {"twin_a": self.twins_loss_scale.fault_free(loss, grads)}, [update]

    def _agreement_step(self, data):
        """Phase 2: gradient agreement updating (§3.2, Eq. 4-5).

        Returns `({"twin_a": ok, "twin_b": ok}, [update])` (see `train_step`)."""
        loss_a, grads_a = self._cross_entropy_gradients(
            self.twin_a, data["image_a"], data["label_a"], "twin_a"
        )
        loss_b, grads_b = self._cross_entropy_gradients(
            self.twin_b, data["image_b"], data["label_b"], "twin_b"
        )
        # Dense gradients (IndexedSlices from embeddings), and zeros for variables
        # the loss does not reach: such a pair gets coefficient 0 and stays closed.
        grads_a = [_dense(g, v) for g, v in zip(grads_a, self._update_a.variables)]
        grads_b = [_dense(g, v) for g, v in zip(grads_b, self._update_b.variables)]
        # Eq. (4) on the *global* gradients (the mean over replicas), so that
        # every replica computes the same gates. The optimizers still receive the
        # local gradients and sum them themselves, so nothing is reduced twice.
        global_a, global_b = _global_mean(grads_a), _global_mean(grads_b)
        coefficients = agreement.agreement_coefficients(
            global_a, global_b, self.agreement_granularity
        )
        agreed = agreement.agreement_gates(coefficients, self.tau)  # Eq. (5)
        gates = self._update_gates(agreed)
        self._record_agreement(coefficients, agreed, gates)
        scale = self.twins_loss_scale
        faults = {
            "twin_a": scale.fault_free(loss_a, global_a),
            "twin_b": scale.fault_free(loss_b, global_b),
        }

        def update(step_ok):
            # float16: a step with a non-finite gradient in either twin is
            # skipped for both. The verdict is global: the gradients were
            # all-reduced.
            finite = scale.check(global_a + global_b, global_grads=True)
            self._update_a.apply(grads_a, gates, step_ok=step_ok, finite=finite)
            self._update_b.apply(grads_b, gates, step_ok=step_ok, finite=finite)

        return faults, [update]

    def _update_gates(self, agreed):
        """The gates the twins are updated with, by `update_rule` (Table 4):
        the agreement gates, a random draw at the same granularity, or None (all
        open)."""
        if self.update_rule == "agreement":
            return agreed
        if self.update_rule == "random":
            step = tf.cast(self.optimizer.iterations, tf.int32)
            return agreement.random_unit_gates(
                [v.shape for v in self.twin_a.trainable_variables],
                self.random_update_prob,
                tf.stack([self.seed, step]),
                self.agreement_granularity,
            )
        return None

    def _record_agreement(self, coefficients, agreed, gates):
        """Trackers and last-step values of the agreement (Figure 1)."""
        mean_coefficients, open_shares = _agreement_diagnostics(coefficients, agreed)
        var_frac, param_frac = agreement.open_fractions(
            open_shares, self._variable_sizes
        )
        if gates is None:
            updated_frac = tf.constant(1.0)
        elif gates is agreed:  # the agreement rule: what is open is what updates
            updated_frac = var_frac
        else:
            updated_frac, _ = agreement.open_fractions(
                agreement.open_shares(gates), self._variable_sizes
            )
        self._train_trackers["agreement"].update_state(
            tf.reduce_mean(mean_coefficients)
        )
        self._train_trackers["agreement_ratio"].update_state(var_frac)
        self._train_trackers["agreement_param_ratio"].update_state(param_frac)
        self._train_trackers["updated_ratio"].update_state(updated_frac)
        self.variable_open_fraction.update_state(open_shares)
        for key, value in (
            ("agreement_ratio", var_frac),
            ("agreement_param_ratio", param_frac),
            ("updated_ratio", updated_frac),
            ("agreement_per_variable", mean_coefficients),
        ):
            self.last_step[key].assign(value)

    def _student_step(self, images, ids):
        """θC's step on θA's batch: `L_c + L_d` against the pseudo-label table.

        Returns `({"student": fault-free}, update)` (see `train_step`)."""
        teacher = self.teacher.lookup(ids)
        scale = self.student_loss_scale
        losses, _, grads, _ = self._network_pass("student")(
            {"teacher": teacher}, {"student": images}, self._loss_factor(scale)
        )
        loss = losses["student"]
        grads = scale.unscale(grads["student"])
        self._train_trackers["loss"].update_state(loss)
        self.last_step["student_loss"].assign(loss)

        def update(step_ok):
            finite = scale.check(grads)
            self._update_student.apply(grads, step_ok=step_ok, finite=finite)

        return {"student": scale.fault_free(loss, grads)}, update

    # ------------------------------------------------------------- test step
    def _twin_probabilities(self, images):
        """`(softmax θA, softmax θB)`; before the split θB is θA (it does not train
        during warm-up), so its forward pass is skipped."""
        p_a = tf.nn.softmax(self._infer(self.twin_a, images))
        # During warm-up θB is untrained and stands for θA: skip its forward pass.
        p_b = tf.cond(
            self.twins_split > 0,
            lambda: tf.nn.softmax(self._infer(self.twin_b, images)),
            lambda: p_a,
        )
        return p_a, p_b

    def joint_probabilities(self, images):
        """Eq. (6): `p_joint = (softmax θA(x) + softmax θB(x)) / 2`, inference mode."""
        p_a, p_b = self._twin_probabilities(tf.cast(images, tf.float32))
        return 0.5 * (p_a + p_b)

    def classifier(self, network="student"):
        """The network `network` names as one logits `keras.Model` of raw images,
        for export: `student` (θC), `twin_a`, `twin_b`, or `joint`, the twins'
        Eq. (6) prediction as the logits `log p_joint` (whose softmax is
        `p_joint`)."""
        if network != "joint":
            return getattr(self, network)
        images = keras.Input(self.twin_a.input_shape[1:], name="image")
        logits = JointLogits(name="joint_logits")(
            self.twin_a(images), self.twin_b(images)
        )
        return keras.Model(images, logits, name="joint")

    def test_step(self, data):
        images, labels, weight = keras.utils.unpack_x_y_sample_weight(data)
        images = tf.cast(images, tf.float32)
        p_a, p_b = self._twin_probabilities(images)
        logits_c = self._infer(self.student, images)
        losses = keras.losses.sparse_categorical_crossentropy(
            labels, logits_c, from_logits=True
        )
        probabilities = {
            "twin_a": p_a,
            "twin_b": p_b,
            "joint": 0.5 * (p_a + p_b),
            "student": logits_c,  # the argmax is the same
        }
        update_test_trackers(self._test_trackers, losses, labels, probabilities, weight)
        return self._logs(self._test_trackers)

    def predict_step(self, data):
        """θC's class probabilities."""
        images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return tf.nn.softmax(self._infer(self.student, tf.cast(images, tf.float32)))

    # ---------------------------------------------------------------- fit
    def ensure_pseudo_label_table(self, num_examples, num_classes):
        """The `[N, K]` table of `p_joint` θC's steps read, made (zeros) if absent,
        so that a checkpoint can be restored into it before the first refresh."""
        return self.teacher.ensure(num_examples, num_classes)

    def run_state(self):
        """Every variable a resumed run needs, by group: the three networks (with
        BatchNorm statistics), the three optimizers (slots and iteration
        counters), the pseudo-label table (once it exists) and GAL's own state
        (the warm-up switch, loss scales, non-finite counters, last-step values).
        Returns `{group: [tf.Variable]}` in a fixed order (`checkpointing.py`)."""
        self._build_optimizers()
        own = [
            self.twins_split,
            self.nonfinite_steps,
            self.nonfinite_networks,
            *self.last_step.values(),
        ]
        own += self.twins_loss_scale.variables + self.student_loss_scale.variables
        groups = {
            "twin_a": self.twin_a.variables,
            "twin_b": self.twin_b.variables,
            "student": self.student.variables,
            "optimizer_a": self.optimizer.variables,
            "optimizer_b": self.optimizer_b.variables,
            "optimizer_student": self.student_optimizer.variables,
            "gal": own,
        }
        if self.pseudo_labels is not None:
            groups["pseudo_labels"] = [self.pseudo_labels]
        return {k: [_tf_variable(v) for v in vs] for k, vs in groups.items()}

    def refresh_pseudo_labels(self, training_set, batch_size=None):
        """Recomputes `p_joint` for every training sample (§3.3, Eq. 6-8).

        Runs in inference mode on the un-augmented images and stores the result in
        the table θC's steps look up by sample id. Also records the table's
        statistics (`teacher.pseudo_label_statistics`): the coverage (share with
        `max p_joint > epsilon`), the joint prediction's agreement with the
        annotated labels, and, when clean labels are known, the pseudo-labels'
        precision and clean accuracy, and returns them.
        """
        if not hasattr(self, "_joint_fn"):
            self._joint_fn = tf.function(
                lambda batch: (batch["id"], self.joint_probabilities(batch["image"])),
                reduce_retracing=True,
                autograph=False,
            )
        return self.teacher.refresh(self._joint_fn, training_set, batch_size)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' pre-fit symbolic build, which GAL does not need: its networks
        are built at construction and its optimizers by `_build_optimizers`.
        Keras' version also averages a batch over replicas first, which fails
        for dict batches under `MultiWorkerMirroredStrategy`."""
        self._build_optimizers()

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_data=None,
        initial_epoch=0,
        initial_step=None,
        **kwargs,
    ):
        """Trains GAL. Takes a `galkeras.TrainingSet`, or images `x` with labels `y`.

        The paired CDAS batches, the warm-up switch and the pseudo-label refresh
        are all driven from here, so `gal.fit(x, y, epochs=E)` needs no extra
        wiring. Other arguments are those of `keras.Model.fit`; `steps_per_epoch`
        is fixed to ⌈N / batch_size⌉ and `shuffle` is replaced by the CDAS plan.

        `initial_step` resumes a run in the middle of an epoch (after restoring
        its state, `galkeras.checkpointing`): training continues at that global
        step, with the pseudo-label table as restored. The rest of that epoch
        runs as one shorter Keras epoch (its logged means cover only the steps
        run here); the returned `History` holds both parts.
        """
        training_set = training_set_of(
            x, y, batch_size, self, self.student.output_shape[-1], kwargs
        )
        if self.optimizer is None:
            raise ValueError("Call GAL.compile(optimizer=...) before fit().")
        self._build_optimizers()
        steps = training_set.steps_per_epoch
        sampler = sampling.CDASSampler(
            training_set.labels,
            training_set.batch_size,
            num_classes=training_set.num_classes,
            mode=training_set.sampling,
            seed=training_set.seed,
            warmup_steps=self.warmup_epochs * steps,
        )
        if initial_step is None:
            initial_step = initial_epoch * steps
        if initial_step < 0:
            raise ValueError(f"initial_step must be >= 0; got {initial_step}.")
        initial_epoch, done_in_epoch = divmod(int(initial_step), steps)
        if done_in_epoch and self.pseudo_labels is None:
            raise ValueError(
                "A mid-epoch initial_step needs the pseudo-label table of that "
                "epoch: restore the run's checkpoint before fit()."
            )
        driver = GALDriver(self, training_set, sampler, resume_step=initial_step)
        dataset = sampling.paired_dataset(
            sampler,
            training_set.images,
            training_set.labels,
            start_step=driver.start_step,
            augment=training_set.augment,
            device=sampling.input_device(self._distribute_strategy),
        )
        self.sampler = sampler
        self.enter_epoch(initial_epoch)
        self.make_train_function(force=True)

        # The driver points the stream and the run step at each part's first
        # step itself (after `BackupAndRestore` has chosen the first epoch).
        return fit_from_step(
            self,
            super().fit,
            dataset,
            initial_step,
            epochs,
            steps,
            verbose=verbose,
            callbacks=[driver, StopOnNonFinite(self, steps), *(callbacks or [])],
            validation_data=validation_data,
            **kwargs,
        )

    # --------------------------------------------------------------- config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "twin_a": keras.saving.serialize_keras_object(self.twin_a),
                "twin_b": keras.saving.serialize_keras_object(self.twin_b),
                "student": keras.saving.serialize_keras_object(self.student),
                "warmup_epochs": self.warmup_epochs,
                "tau": self.tau,
                "epsilon": self.epsilon,
                "update_rule": self.update_rule,
                "random_update_prob": self.random_update_prob,
                "masked_update": self.masked_update,
                "train_student": self.train_student,
                "seed": self.seed,
                "on_nonfinite": self.on_nonfinite,
                "agreement_granularity": self.agreement_granularity,
                "student_start": self.student_start,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("twin_a", "twin_b", "student"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


class VectorMean(keras.metrics.Metric):
    """Element-wise running mean of a fixed-length vector (per-variable gates)."""

    def __init__(self, length, name="vector_mean", **kwargs):
        super().__init__(name=name, **kwargs)
        self.length = int(length)
        self.total = self.add_variable(
            shape=(self.length,), initializer="zeros", name="total"
        )
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, values):
        self.total.assign_add(tf.cast(values, self.dtype))
        self.count.assign_add(1.0)

    def result(self):
        return self.total / keras.ops.maximum(self.count, 1.0)

    def get_config(self):
        return {**super().get_config(), "length": self.length}


def _mean_ce(logits, inputs):
    """`NetworkPass` loss: each network's mean cross entropy on `labels`."""
    return {
        name: keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                inputs["labels"], value, from_logits=True
            )
        )
        for name, value in logits.items()
    }, None


def _dense(gradient, variable):
    if gradient is None:
        return tf.zeros_like(variable.value)
    return tf.convert_to_tensor(gradient)


@keras.saving.register_keras_serializable(package="galkeras")
class JointLogits(keras.layers.Layer):
    """Eq. (6) as logits: `log((softmax(z_A) + softmax(z_B)) / 2)`, so that a
    softmax of the output gives back the twins' joint prediction `p_joint`."""

    def call(self, logits_a, logits_b):
        p_joint = 0.5 * (
            keras.ops.softmax(keras.ops.cast(logits_a, "float32"))
            + keras.ops.softmax(keras.ops.cast(logits_b, "float32"))
        )
        # The smallest normal float32: a probability that underflowed to 0 gives
        # a very negative logit, not -inf.
        return keras.ops.log(keras.ops.maximum(p_joint, 1.1754944e-38))
