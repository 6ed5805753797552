"""The paper's optimiser (§4.1.2): SGD with momentum and PyTorch-style weight decay.

Keras' own `SGD(weight_decay=...)` decays decoupled from the gradient, and keeps a
velocity that already contains the learning rate. The paper trains with PyTorch's
`torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`, in which the decay is *coupled*:
`g <- g + wd * theta` before momentum, then `buf <- mu * buf + g`,
`theta <- theta - lr * buf`. This class reproduces that rule exactly and keeps the
decoupled variant as an option.
"""

import keras
from keras import ops

WEIGHT_DECAY_MODES = ("coupled", "decoupled")


@keras.saving.register_keras_serializable(package="galkeras")
class SGD(keras.optimizers.Optimizer):
    """SGD with heavy-ball momentum as PyTorch defines it (dampening 0).

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: float >= 0, the momentum factor μ (paper: 0.9).
        weight_decay: float >= 0 (paper: 5e-4).
        weight_decay_mode: `"coupled"` (default, PyTorch and the paper: the decay
            is added to the gradient before momentum) or `"decoupled"` (Keras:
            `theta <- theta - lr * wd * theta`, outside momentum).
        nesterov: bool, Nesterov momentum as PyTorch computes it.
        **kwargs: the base `keras.optimizers.Optimizer` arguments (`clipnorm`,
            `global_clipnorm`, `loss_scale_factor`, ...).

    Example:
    ```python
    opt = galkeras.optimizers.SGD(0.06, momentum=0.9, weight_decay=5e-4)
    ```
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        weight_decay_mode="coupled",
        nesterov=False,
        name="sgd",
        **kwargs,
    ):
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}; "
                f"got {weight_decay_mode!r}."
            )
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0.")
        decoupled = weight_decay_mode == "decoupled" and weight_decay > 0
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay if decoupled else None,
            name=name,
            **kwargs,
        )
        self.momentum = float(momentum)
        self.coupled_weight_decay = (
            float(weight_decay) if weight_decay_mode == "coupled" else 0.0
        )
        self.weight_decay_mode = weight_decay_mode
        self.nesterov = bool(nesterov)
        self._weight_decay_value = float(weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum > 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            gradient = ops.add(
                gradient, ops.multiply(variable, self.coupled_weight_decay)
            )
        if self.momentum > 0:
            buf = self.momentums[self._get_variable_index(variable)]
            self.assign(buf, ops.add(ops.multiply(buf, self.momentum), gradient))
            if self.nesterov:
                gradient = ops.add(gradient, ops.multiply(buf, self.momentum))
            else:
                gradient = buf
        self.assign_sub(variable, ops.multiply(gradient, lr))

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self._weight_decay_value,
                "weight_decay_mode": self.weight_decay_mode,
                "nesterov": self.nesterov,
            }
        )
        return config


def piecewise_epoch_schedule(
    learning_rate, decay_epochs, decay_factor, steps_per_epoch
):
    """Piecewise-constant learning rate, multiplied by `decay_factor` at each epoch
    in `decay_epochs` (§4.1.2: ÷10), exact to the step.

    The optimiser evaluates the schedule at its iteration count before the update,
    so step `s` (0-based) belongs to epoch `s // steps_per_epoch`; Keras'
    `PiecewiseConstantDecay` keeps `values[i]` while `step <= boundaries[i]`, hence
    the boundary `e * steps_per_epoch - 1`.
    """
    decay_epochs = sorted(int(e) for e in decay_epochs)
    if not decay_epochs:
        return float(learning_rate)
    boundaries = [e * steps_per_epoch - 1 for e in decay_epochs]
    values = [
        float(learning_rate) * decay_factor**i for i in range(len(boundaries) + 1)
    ]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
