"""`NoisyLabelMethod`: what every peer method shares, so that each is one file.

A method is a `keras.Model` over one or two networks, each with its own
optimizer. It trains on one seeded, shuffled stream of the training set (the
same augmentation as GAL's, one pass per epoch; only GAL pairs batches with
CDAS), and a subclass says only how one batch's logits become each network's
loss (`network_losses`). Shared here:

- the run step, a checkpointed variable the train step advances, from which the
  epoch (and so the forget-rate schedule) follows inside the graph;
- float32 losses under mixed precision, with float16 loss scaling;
- `on_nonfinite` (stop, or skip the step for every network), as GAL has it;
- evaluation of each network and of the two networks' joint prediction
  (Eq. 6 of the GAL paper: the mean of their softmax outputs);
- `fit` from any global step (a resumed run continues mid-epoch), with no
  host-device sync between steps and any `steps_per_execution` that divides
  an epoch (`fit_from_step`, `FitCallbacks`), `predict`
  with the reported network, `classifier` for export, `run_state` for
  checkpoints, and `get_config` for `.keras` files.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from galkeras import sampling
from galkeras.gated_update import (
    DynamicLossScale,
    GatedUpdate,
    NonFiniteStop,
    record_nonfinite,
)
from galkeras.methods.small_loss import ForgetRate, num_remember_tensor
from galkeras.network_pass import Inference, NetworkPass, resolve_jit_compile
from galkeras.training_set import TrainingSet

ON_NONFINITE = ("stop", "skip_step")
JOINT = "joint"


class NoisyLabelMethod(keras.Model):
    """Base of the peer methods: networks, optimizers, the stream and the step.

    Subclasses set `NETWORKS` (the names of their networks, also attribute
    names), `REPORTED` (the network whose accuracy is the method's result), and
    implement `network_losses`.

    Args:
        networks: `keras.Model`s mapping raw images to logits, one per name in
            `NETWORKS`, in that order.
        on_nonfinite: `"stop"` (default: a step with a non-finite loss or
            gradient and every later one move no network, and `fit` raises at
            its next check, see `GAL`) or `"skip_step"` (that step moves no
            network and is counted in `nonfinite_steps`).
    """

    NETWORKS = ()
    REPORTED = None

    def __init__(self, *networks, on_nonfinite="stop", **kwargs):
        super().__init__(**kwargs)
        self._infer = Inference(False)  # until `compile` says otherwise
        if len(networks) != len(self.NETWORKS):
            raise ValueError(
                f"{type(self).__name__} takes {len(self.NETWORKS)} networks "
                f"{self.NETWORKS}; got {len(networks)}."
            )
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}; got {on_nonfinite!r}."
            )
        # === Layers ===
        for name, net in zip(self.NETWORKS, networks):
            setattr(self, name, net)
        # === Config ===
        self.on_nonfinite = on_nonfinite
        # === State ===
        # Steps of the run done so far: advanced by the train step itself, so the
        # epoch (and every schedule of it) is known inside the graph, and saved
        # with the run.
        self.run_step = self._counter("run_step", "int64")
        self.steps_per_epoch = self._counter("steps_per_epoch", "int64")
        self.nonfinite_steps = self._counter("nonfinite_steps", "int32")
        self.nonfinite_networks = self._counter("nonfinite_networks", "int32")
        self.nonfinite_stop = NonFiniteStop(
            self.distribute_strategy, self.NETWORKS, on_nonfinite == "stop"
        )
        # The run step after the latest execution of `fit`, as Python knows it
        # without reading `run_step` (`FitCallbacks` sets it).
        self.host_step = 0
        self.loss_scaling = networks[0].dtype_policy.compute_dtype == "float16"
        self.loss_scale = DynamicLossScale(self, "loss_scale", self.loss_scaling)
        self._updates = None
        # === Metrics ===
        self._train_trackers = {"loss": keras.metrics.Mean(name="loss")}
        for key in self.train_log_keys():
            self._train_trackers[key] = keras.metrics.Mean(name=key)
        evaluated = [*self.NETWORKS, *([JOINT] if len(self.NETWORKS) > 1 else [])]
        self._test_trackers = {"loss": keras.metrics.Mean(name="loss")}
        for key in evaluated:
            self._test_trackers[f"{key}_accuracy"] = (
                keras.metrics.SparseCategoricalAccuracy(name=f"{key}_accuracy")
            )
        self.built = all(net.built for net in networks)

    def _counter(self, name, dtype):
        return self.add_weight(
            shape=(),
            dtype=dtype,
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name=name,
        )

    @property
    def global_step(self):
        """The run step as a Python int (what checkpoints and logs are keyed by)."""
        return int(self.run_step.numpy())

    @property
    def networks(self):
        """`{name: keras.Model}`, in `NETWORKS` order."""
        return {name: getattr(self, name) for name in self.NETWORKS}

    def train_log_keys(self):
        """Names of the method's own per-step values that `network_losses`
        returns besides the losses (their epoch means are logged)."""
        return ()

    def network_losses(self, logits, labels, ids, epoch):
        """The losses of one batch.

        Args:
            logits: `{network name: float32 [B, K] logits}` of the local batch,
                computed in training mode.
            labels: int32 `[B]` noisy labels.
            ids: int64 `[B]` sample ids.
            epoch: int64 scalar, the 0-based epoch of this step.

        Returns:
            `(losses, update, values)`: `{network name: scalar loss}` (the
            gradient of each updates that network; a loss may serve both),
            `update`, None or a scalar bool (False: no network moves at this
            step), and `{key: scalar}` for `train_log_keys`.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- keras
    def build(self, input_shape=None):
        for net in self.networks.values():
            if not net.built:
                net.build(input_shape)
        self.built = True

    def call(self, inputs, training=False):
        """The reported network's logits."""
        return getattr(self, self.REPORTED)(inputs, training=training)

    def compile(self, optimizer="sgd", **kwargs):
        """One optimizer per network: `optimizer` for the first, clones for the
        others (the same hyperparameters and schedule). Other arguments are
        `keras.Model.compile`'s; the losses are the method's own. `jit_compile`
        (`"auto"`, True, False) compiles the networks' forward and backward
        pass with XLA under every strategy (`galkeras.network_pass`), and the
        whole step where Keras can; `"auto"` is XLA on a GPU only."""
        for arg in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"{type(self).__name__}.compile does not take `{arg}`: the "
                    "method's losses are fixed."
                )
        optimizer = keras.optimizers.get(optimizer)
        whole_step, jit_passes = resolve_jit_compile(
            kwargs.get("jit_compile", "auto"), self._distribute_strategy
        )
        super().compile(optimizer=optimizer, **{**kwargs, "jit_compile": whole_step})
        self._pass = NetworkPass(
            self.networks, self._pass_losses, jit_passes, name="network_pass"
        )
        self._infer = Inference(jit_passes)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # The method scales its losses itself (one scale for all networks).
            self.optimizer = self.optimizer.inner_optimizer
        self.optimizers = [self.optimizer] + [
            self.optimizer.__class__.from_config(self.optimizer.get_config())
            for _ in self.NETWORKS[1:]
        ]
        self._updates = None

    def check_xla(self, image_shape, batch_size=2):
        """Raises ValueError, naming the networks, when `jit_compile` asks for
        XLA and XLA cannot compile their pass (nothing runs)."""
        images = tf.zeros([batch_size, *image_shape], tf.float32)
        labels = tf.zeros([batch_size], tf.int64)
        self._pass.check_compiles(
            {"labels": labels, "ids": labels, "epoch": tf.zeros([], tf.int64)},
            {name: images for name in self.networks},
        )

    def _pass_losses(self, logits, inputs):
        """`network_losses` as a `NetworkPass` loss."""
        losses, update, values = self.network_losses(
            logits, inputs["labels"], inputs["ids"], inputs["epoch"]
        )
        return losses, (update, values)

    def get_compile_config(self):
        return {"optimizer": keras.saving.serialize_keras_object(self.optimizer)}

    def compile_from_config(self, config):
        self.compile(keras.saving.deserialize_keras_object(config["optimizer"]))
        if self.built:
            self._build_optimizers()

    def _build_optimizers(self):
        """Builds each optimizer on its own network's variables only."""
        if self._updates is not None:
            return
        with self.distribute_strategy.scope():
            for opt, net in zip(self.optimizers, self.networks.values()):
                if not opt.built:
                    opt.build(net.trainable_variables)
        self._updates = [
            GatedUpdate(opt, net.trainable_variables, self.loss_scale)
            for opt, net in zip(self.optimizers, self.networks.values())
        ]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # The networks are built at construction; Keras' symbolic build would
        # also average a dict batch over replicas, which is not needed.
        self._build_optimizers()

    @property
    def metrics(self):
        return [*self._train_trackers.values(), *self._test_trackers.values()]

    def _logs(self, trackers):
        logs = {name: tracker.result() for name, tracker in trackers.items()}
        if self.distribute_strategy.extended._in_multi_worker_mode():
            # Keras averages multi-worker logs along an axis.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    # ------------------------------------------------------------ train step
    def train_step(self, data):
        images = tf.cast(data["image_a"], tf.float32)
        labels, ids = data["label_a"], data["id_a"]
        epoch = self.run_step // tf.maximum(self.steps_per_epoch, 1)
        networks = self.networks
        replicas = self.distribute_strategy.num_replicas_in_sync
        # The forward passes move BatchNorm statistics: keep the old ones.
        saved = [
            (_tf_variable(v), tf.identity(v.value))
            for net in networks.values()
            for v in net.non_trainable_variables
        ]
        # The optimizer sums gradients over replicas, so each replica
        # contributes its mean divided by the replica count.
        losses, (update, values), grads, _ = self._pass(
            {"labels": labels, "ids": ids, "epoch": epoch},
            {name: images for name in networks},
            self.loss_scale.scale(1.0 / replicas),
        )
        grads = {name: self.loss_scale.unscale(g) for name, g in grads.items()}
        faults = {
            name: self.loss_scale.fault_free(losses[name], grads[name])
            for name in networks
        }
        step_ok = record_nonfinite(
            faults, self.NETWORKS, self.nonfinite_steps, self.nonfinite_networks
        )
        # `stop`: from the first faulty step on, nothing moves until the check.
        step_ok = self.nonfinite_stop.hold(
            step_ok, self.run_step, self.nonfinite_networks
        )
        finite = self.loss_scale.check([g for gs in grads.values() for g in gs])
        for (name, net), gated in zip(networks.items(), self._updates):
            # A step the method leaves out (`update` False) closes every gate:
            # weights and slots stay, but the iteration counter, and with it
            # the learning-rate schedule, keeps the epoch's clock. A held-back
            # non-finite step holds the counter back too.
            gated.apply(
                grads[name],
                gates=None if update is None else [update] * len(grads[name]),
                step_ok=step_ok,
                finite=finite,
            )
        for variable, old in saved:
            variable.assign(tf.where(step_ok, variable.read_value(), old))
        self.run_step.assign_add(1)
        self._train_trackers["loss"].update_state(losses[self.REPORTED])
        for key, value in values.items():
            self._train_trackers[key].update_state(value)
        return self._logs(self._train_trackers)

    # ------------------------------------------------------------ evaluation
    def test_step(self, data):
        images, labels, weight = keras.utils.unpack_x_y_sample_weight(data)
        images = tf.cast(images, tf.float32)
        probabilities = {
            name: tf.nn.softmax(self._infer(net, images))
            for name, net in self.networks.items()
        }
        if len(probabilities) > 1:
            probabilities[JOINT] = tf.add_n(list(probabilities.values())) / len(
                probabilities
            )
        reported = keras.losses.sparse_categorical_crossentropy(
            labels, probabilities[self.REPORTED]
        )
        update_test_trackers(
            self._test_trackers, reported, labels, probabilities, weight
        )
        return self._logs(self._test_trackers)

    def predict_step(self, data):
        """The reported network's class probabilities."""
        images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        reported = self.networks[self.REPORTED]
        return tf.nn.softmax(self._infer(reported, tf.cast(images, tf.float32)))

    def classifier(self, network=None):
        """The network `network` names (default: the reported one) as a logits
        `keras.Model` of raw images, for export; `"joint"` is the networks'
        joint prediction as the logits `log p_joint`."""
        network = network or self.REPORTED
        if network != JOINT:
            return getattr(self, network)
        from galkeras.model import JointLogits

        first, second = self.networks.values()
        images = keras.Input(first.input_shape[1:], name="image")
        logits = JointLogits(name="joint_logits")(first(images), second(images))
        return keras.Model(images, logits, name=JOINT)

    def run_state(self):
        """Every variable a resumed run needs, `{group: [tf.Variable]}`: each
        network (with BatchNorm statistics), each optimizer, and the method's
        own state (run step, loss scale, non-finite counters)."""
        self._build_optimizers()
        groups = {name: net.variables for name, net in self.networks.items()}
        for name, opt in zip(self.NETWORKS, self.optimizers):
            groups[f"optimizer_{name}"] = opt.variables
        groups["method"] = [
            self.run_step,
            self.steps_per_epoch,
            self.nonfinite_steps,
            self.nonfinite_networks,
            *self.loss_scale.variables,
        ]
        return {k: [_tf_variable(v) for v in vs] for k, vs in groups.items()}

    # ---------------------------------------------------------------- fit
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
        """Trains the method on a `galkeras.TrainingSet` or images `x` with labels
        `y`: one seeded shuffled pass over the set per epoch, the set's
        augmentation applied per step.

        `initial_step` resumes a run at that global step (after restoring its
        state); the rest of a started epoch runs as one shorter Keras epoch.
        Other arguments are `keras.Model.fit`'s; `steps_per_epoch` is
        ⌈N / batch_size⌉ and `shuffle` is the seeded stream's.
        """
        first = next(iter(self.networks.values()))
        training_set = training_set_of(
            x, y, batch_size, self, first.output_shape[-1], kwargs
        )
        if self.optimizer is None:
            raise ValueError(
                f"Call {type(self).__name__}.compile(optimizer=...) before fit()."
            )
        self._build_optimizers()
        steps = training_set.steps_per_epoch
        self.steps_per_epoch.assign(steps)
        if initial_step is None:
            initial_step = initial_epoch * steps
        # One shuffled stream: the sampler's warm-up plan, for the whole run.
        sampler = sampling.CDASSampler(
            training_set.labels,
            training_set.batch_size,
            num_classes=training_set.num_classes,
            mode="random",
            seed=training_set.seed,
            warmup_steps=2**62,
        )
        start = {"step": int(initial_step)}
        dataset = sampling.paired_dataset(
            sampler,
            training_set.images,
            training_set.labels,
            start_step=lambda: start["step"],
            augment=training_set.augment,
            device=sampling.input_device(self._distribute_strategy),
        )
        self.sampler = sampler

        def on_part(first_step):
            start["step"] = first_step
            self.run_step.assign(first_step)

        return fit_from_step(
            self,
            super().fit,
            dataset,
            initial_step,
            epochs,
            steps,
            on_part,
            verbose=verbose,
            callbacks=[StopOnNonFinite(self, steps), *(callbacks or [])],
            validation_data=validation_data,
            **kwargs,
        )

    # --------------------------------------------------------------- config
    def get_config(self):
        config = super().get_config()
        for name, net in self.networks.items():
            config[name] = keras.saving.serialize_keras_object(net)
        config.update(on_nonfinite=self.on_nonfinite)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        networks = [
            keras.saving.deserialize_keras_object(config.pop(name))
            for name in cls.NETWORKS
        ]
        return cls(*networks, **config)


class SmallLossMethod(NoisyLabelMethod):
    """Base of the two-network peers that keep the small-loss share of each batch
    (Co-teaching, Co-teaching+, JoCoR): net 1 and net 2, net 1 reported, and the
    forget-rate schedule (`small_loss.ForgetRate`).

    Args:
        net1, net2: `keras.Model`s of raw images to logits.
        forget_rate: τ_f in [0, 1): the noise rate when known.
        num_gradual: T_k, epochs of the ramp (official: 10).
        exponent: c of the ramp (official: 1).
        **kwargs: `NoisyLabelMethod`'s (`on_nonfinite`).
    """

    NETWORKS = ("net1", "net2")
    REPORTED = "net1"

    def __init__(self, net1, net2, forget_rate, num_gradual=10, exponent=1, **kwargs):
        super().__init__(net1, net2, **kwargs)
        self.forget = ForgetRate(forget_rate, num_gradual, exponent)

    def kept(self, labels, epoch):
        """`(forget rate, count)` of this epoch for the local batch of `labels`:
        the float64 rate and the int32 `int((1 - rate) * B)` samples kept."""
        rate = self.forget(epoch)
        return rate, num_remember_tensor(rate, tf.shape(labels)[0])

    def get_config(self):
        return {
            **super().get_config(),
            "forget_rate": self.forget.forget_rate,
            "num_gradual": self.forget.num_gradual,
            "exponent": self.forget.exponent,
        }


def update_test_trackers(trackers, losses, labels, probabilities, weight):
    """Adds one evaluation batch to a method's test trackers: the mean loss
    (`losses`, per example) and each `{name}_accuracy` of `probabilities`
    (dict name -> `[b, K]`). `weight` (`[b]`, or None for all ones) is 0 on
    the padding of `sampling.evaluation_dataset`'s last batch, so each real
    example counts once in every mean."""
    trackers["loss"].update_state(losses, sample_weight=weight)
    for name, p in probabilities.items():
        trackers[f"{name}_accuracy"].update_state(labels, p, sample_weight=weight)


def fit_from_step(
    method,
    keras_fit,
    dataset,
    initial_step,
    epochs,
    steps,
    on_part=None,
    callbacks=None,
    verbose="auto",
    **fit_kwargs,
):
    """Keras `fit` (`keras_fit`, `method`'s inherited `fit`) over `dataset` so
    that training covers global steps `initial_step` to `epochs * steps`.

    Keras' epochs all have one length, so the rest of an epoch a resumed run
    stopped in is a fit of its own; the two `History` objects are merged.
    `on_part(first_step)` runs before each fit (to point a stream at its step).
    Each fit calls `callbacks` through `FitCallbacks`, which reads nothing from
    the device between steps.

    Keras draws `method.steps_per_execution` (k) batches per call, whatever the
    epoch has left, so k must divide `steps`. The rest of a resumed epoch runs
    at the largest k' dividing both k and its length: its calls then still end
    at every multiple of k, where logging and checkpoints act.
    """
    if initial_step < 0:
        raise ValueError(f"initial_step must be >= 0; got {initial_step}.")
    every = method.steps_per_execution
    if not isinstance(every, int) or every < 1 or steps % every:
        raise ValueError(
            f"steps_per_execution={every} must be an integer >= 1 that divides "
            f"the {steps} steps of an epoch: Keras would otherwise run the last "
            "call of an epoch into the next one."
        )

    def part(first_epoch, last_epoch, steps_per_epoch, first_step):
        _set_steps_per_execution(method, math.gcd(every, steps_per_epoch))
        if on_part is not None:
            on_part(first_step)
        callback_list = FitCallbacks(
            callbacks,
            method,
            first_step,
            steps,
            verbose=verbose,
            epochs=last_epoch,
            steps=steps_per_epoch,
        )
        return keras_fit(
            dataset,
            epochs=last_epoch,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch,
            shuffle=False,
            callbacks=callback_list,
            verbose=verbose,
            **fit_kwargs,
        )

    try:
        first_epoch, done_in_epoch = divmod(int(initial_step), steps)
        if not done_in_epoch:
            return part(first_epoch, epochs, steps, first_epoch * steps)
        history = part(
            first_epoch, first_epoch + 1, steps - done_in_epoch, initial_step
        )
        if first_epoch + 1 >= epochs:
            return history
        rest = part(first_epoch + 1, epochs, steps, (first_epoch + 1) * steps)
    finally:
        _set_steps_per_execution(method, every)
    for key, values in history.history.items():
        rest.history[key] = values + rest.history.get(key, [])
    rest.epoch = history.epoch + rest.epoch
    return rest


def _set_steps_per_execution(method, every):
    """Sets `method.steps_per_execution`, remaking the functions that were
    traced with the old value."""
    if method.steps_per_execution == every:
        return
    method.steps_per_execution = every
    method.make_train_function(force=True)
    if method.test_function is not None:
        method.make_test_function(force=True)


class FitCallbacks(keras.callbacks.CallbackList):
    """The callback list of a method's `fit`: Keras' own, but a batch costs no
    host-device sync, and callbacks know the run step without reading it.

    With TensorFlow, Keras' list converts every log to Python after every call
    of the train function (it has no asynchronous path on that backend), which
    waits for the device, whether any callback reads the logs or not. Here the
    batch-end hooks get the logs as the tensors the train step returned: a
    callback that reads one (`float(logs["loss"])`) pays the wait; the others
    do not. Epoch ends get Python logs, as in Keras.

    Before the batch-end hooks run, it sets `method.host_step` to the run step
    after that call, from Keras' batch index (the last step of the call), so
    that `RunLogger` and `CheckpointCallback` act at their steps without
    reading `run_step` from the device.

    Args:
        callbacks: the fit's callbacks.
        method: the `GAL` or `NoisyLabelMethod` being fitted.
        first_step: the run step this fit starts at.
        steps_per_epoch: steps of a whole epoch of the run.
        **params: Keras' callback params (`verbose`, `epochs`, `steps`).
    """

    def __init__(self, callbacks, method, first_step, steps_per_epoch, **params):
        super().__init__(
            callbacks,
            add_history=True,
            add_progbar=params["verbose"] != 0,
            model=method,
            **params,
        )
        self._first_step = int(first_step)
        self._steps_per_epoch = int(steps_per_epoch)
        self._epoch_start = self._first_step

    def on_train_begin(self, logs=None):
        self.model.host_step = self._first_step
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        # A resumed epoch starts at the fit's first step, any other at its own.
        self._epoch_start = max(epoch * self._steps_per_epoch, self._first_step)
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.model.host_step = self._epoch_start + batch + 1
        for callback in self.callbacks:
            callback.on_train_batch_end(batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        for callback in self.callbacks:
            callback.on_test_batch_end(batch, logs)


def training_set_of(x, y, batch_size, method, num_classes, fit_kwargs):
    """The `TrainingSet` a method's `fit(x, y, batch_size)` trains on: `x` itself
    when it is one, else arrays `x`, `y` wrapped in one. Refuses a
    `tf.data.Dataset` and the `fit` arguments that the method's own stream
    replaces (popped from `fit_kwargs`)."""
    name = type(method).__name__
    if isinstance(x, tf.data.Dataset):
        raise TypeError(
            f"{name}.fit takes images and labels (arrays) or a galkeras.TrainingSet, "
            "not a tf.data.Dataset: it draws its own seeded, resumable stream and "
            "needs random access to the whole training set. Wrap your arrays in "
            "galkeras.TrainingSet(images, labels, batch_size=..., augment=...)."
        )
    for arg in ("steps_per_epoch", "shuffle", "validation_split", "sample_weight"):
        if fit_kwargs.pop(arg, None) not in (None, True):
            raise ValueError(f"{name}.fit does not support `{arg}`.")
    if isinstance(x, TrainingSet):
        if y is not None or batch_size is not None:
            raise ValueError(
                "Pass labels and batch_size inside the TrainingSet, not to fit()."
            )
        return x
    return TrainingSet(
        np.asarray(x), y, batch_size=batch_size or 32, num_classes=num_classes
    )


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises `galkeras.gated_update.NonFiniteError` at the end of an epoch that
    had a step with a non-finite loss or gradient, when the method's
    `on_nonfinite` is `stop`. The step itself, and every step after it, was held
    back in the graph (`NonFiniteStop`); `RunLogger` and `CheckpointCallback`
    check too, before they read or save anything. The methods' `fit` puts it
    first, so no other callback sees such an epoch end.

    Args:
        method: `GAL` or a `NoisyLabelMethod`.
        steps_per_epoch: steps of one epoch (for the message).
    """

    def __init__(self, method, steps_per_epoch):
        super().__init__()
        self._method = method
        self._steps = int(steps_per_epoch)

    def on_train_begin(self, logs=None):
        self._method.nonfinite_stop.reset(self._steps)

    def on_epoch_end(self, epoch, logs=None):
        self._method.nonfinite_stop.check()


def _tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v
