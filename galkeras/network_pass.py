"""Networks' forward and backward passes as one pure function, XLA-compiled
under every `tf.distribute` strategy.

Keras compiles a whole train step with XLA only without a strategy: under
`MirroredStrategy` a compiled step reads variables that live on other devices
and fails. A `NetworkPass` is the part of a step that costs: the forward passes
of one or more networks, their losses and their gradients. It takes the weights
as tensors (`keras.Layer.stateless_call`), reads no variable and synchronises
nothing, so `tf.function(jit_compile=True)` compiles it on every replica of
every strategy. The all-reduce, the agreement and the updates run outside it;
the new BatchNorm statistics it returns are assigned after it.

With `jit_compile=False` the same function runs inline in the step: the two
settings compute the same thing, and a test checks that they agree.

Like Keras 3's own step functions, galkeras' functions are traced as written,
without autograph (`autograph=False`): none has Python control flow on
tensors, and autograph would rewrite their source at each process's first
trace.
"""

import tensorflow as tf


class NetworkPass:
    """The forward and backward pass of `networks` under a joint loss.

    Args:
        networks: dict name -> `keras.Model` (raw images -> logits).
        loss_fn: `loss_fn(logits, inputs) -> (losses, extras)`: `logits` a
            dict name -> float32 logits, `inputs` the dict given to the call;
            `losses` a dict name -> scalar loss of that network (its gradients
            are taken of it), `extras` any nest of tensors returned as is. It
            must be a pure function of its arguments (no variable reads).
        jit_compile: bool, whether the pass is one XLA computation.
        name: names the compiled function (and the piece an XLA failure names).
    """

    def __init__(self, networks, loss_fn, jit_compile, name="network_pass"):
        self.networks = dict(networks)
        self.loss_fn = loss_fn
        self.jit_compile = bool(jit_compile)
        self.name = name
        self._function = (
            tf.function(
                self._pure, jit_compile=True, reduce_retracing=True, autograph=False
            )
            if self.jit_compile
            else self._pure
        )

    def _pure(self, trainable, non_trainable, inputs, images, scale):
        names = list(self.networks)
        with tf.GradientTape(persistent=len(names) > 1) as tape:
            tape.watch(trainable)
            logits, new_state = {}, {}
            for name in names:
                # uint8 batches are cast here, on the device (inside XLA).
                outputs, new_state[name] = self.networks[name].stateless_call(
                    trainable[name],
                    non_trainable[name],
                    tf.cast(images[name], tf.float32),
                    training=True,
                )
                logits[name] = tf.cast(outputs, tf.float32)
            losses, extras = self.loss_fn(logits, inputs)
            scaled = {name: losses[name] * scale for name in names}
        grads = {name: tape.gradient(scaled[name], trainable[name]) for name in names}
        del tape
        return losses, extras, grads, new_state, logits

    def _arguments(self, inputs, images, scale):
        values = {name: _weight_values(net) for name, net in self.networks.items()}
        trainable = {name: v[0] for name, v in values.items()}
        non_trainable = {name: v[1] for name, v in values.items()}
        images = {name: images[name] for name in self.networks}
        return trainable, non_trainable, inputs, images, tf.cast(scale, tf.float32)

    def __call__(self, inputs, images, scale=1.0):
        """Runs the pass and moves each network's state (BatchNorm statistics).

        Args:
            inputs: the dict handed to `loss_fn` (labels, ids, ...).
            images: dict name -> the batch that network sees.
            scale: the factor each loss is multiplied by before differentiation
                (1 / replicas, times a float16 loss scale).

        Returns:
            `(losses, extras, grads, logits)`: `grads` a dict name -> the list
            of gradients of `losses[name] * scale` for that network's trainable
            variables, in their order.
        """
        losses, extras, grads, new_state, logits = self._function(
            *self._arguments(inputs, images, scale)
        )
        for name, net in self.networks.items():
            for variable, value in zip(net.non_trainable_variables, new_state[name]):
                variable.assign(value)
        return losses, extras, grads, logits

    def check_compiles(self, inputs, images, scale=1.0):
        """Lowers the pass to XLA for these input shapes without running it.

        Raises:
            ValueError: naming the pass and its networks when XLA cannot compile
                it (an op without an XLA kernel, for example), and suggesting
                `--jit_compile=false`.
        """
        if not self.jit_compile:
            return
        try:
            self._function.experimental_get_compiler_ir(
                *self._arguments(inputs, images, scale)
            )(stage="hlo")
        except (tf.errors.OpError, ValueError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            nets = ", ".join(
                f"{name} ({net.name})" for name, net in self.networks.items()
            )
            raise ValueError(
                f"XLA cannot compile {self.name} of {nets}: {first} "
                "Use --jit_compile=false (jit_compile=False in Python) to train "
                "without XLA."
            ) from error


class Inference:
    """Networks' inference-mode logits (float32), each network's forward pass
    one XLA computation when `jit_compile` (test steps, predictions and the
    pseudo-label refresh: it reads the weights as tensors, so it compiles on
    every replica too)."""

    def __init__(self, jit_compile):
        self.jit_compile = bool(jit_compile)
        self._functions = {}

    def __call__(self, network, images):
        if not self.jit_compile:
            images = tf.cast(images, tf.float32)
            return tf.cast(network(images, training=False), tf.float32)
        key = id(network)
        if key not in self._functions:

            def pure(trainable, non_trainable, images):
                outputs, _ = network.stateless_call(
                    trainable,
                    non_trainable,
                    tf.cast(images, tf.float32),
                    training=False,
                )
                return tf.cast(outputs, tf.float32)

            self._functions[key] = tf.function(
                pure, jit_compile=True, reduce_retracing=True, autograph=False
            )
        return self._functions[key](*_weight_values(network), images)


def _weight_values(network):
    """`(trainable, non_trainable)`: `network`'s weights as tensors, in the
    order `stateless_call` takes them."""
    return (
        [v.value for v in network.trainable_variables],
        [v.value for v in network.non_trainable_variables],
    )


def resolve_jit_compile(jit_compile, strategy):
    """`(whole_step, passes)`: whether Keras compiles the whole step and whether
    the `NetworkPass`es are compiled, for a method's `jit_compile` and the
    strategy it was built under (`None`: none).

    `"auto"` is XLA on a GPU and none on a CPU, where compiled steps measured
    slower (see the README's Performance). Keras can compile a whole step only
    outside `tf.distribute` (and refuses to under op determinism); the passes
    compile under every strategy.
    """
    if jit_compile == "auto":
        jit_compile = bool(tf.config.list_physical_devices("GPU"))
    if jit_compile not in (True, False):
        raise ValueError(f"jit_compile={jit_compile!r} must be True, False or 'auto'.")
    return bool(jit_compile and strategy is None), jit_compile
