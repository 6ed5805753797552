"""`CoTeaching`: two networks that teach each other with their small-loss samples."""

import keras
import tensorflow as tf

from galkeras.methods.base import SmallLossMethod
from galkeras.methods.peer_losses import coteaching_losses


@keras.saving.register_keras_serializable(package="galkeras")
class CoTeaching(SmallLossMethod):
    """Co-teaching (Han et al., NeurIPS 2018; https://github.com/bhanML/Co-teaching).

    Both networks see the same batch. Each keeps the `int(R(e) · B)` samples of
    its smallest cross entropy (R(e) = 1 − forget rate of epoch e, the official
    linear ramp: `ForgetRate`), and each network learns from the samples its
    peer kept (`peer_losses.coteaching_losses`). Net 1 is reported; the joint
    prediction is evaluated too.

    Under `tf.distribute` each replica selects within its own share of the batch.

    Args:
        net1, net2: `keras.Model`s of raw images to logits (independently
            initialised, as in the paper).
        forget_rate: τ_f in [0, 1): the noise rate when known.
        num_gradual: T_k, epochs of the ramp (official: 10).
        exponent: c of the ramp (official: 1).
        divide_twice: the official loss's double division by the number kept
            (see `coteaching_losses`); default off.
        **kwargs: `NoisyLabelMethod`'s (`on_nonfinite`).
    """

    def __init__(
        self,
        net1,
        net2,
        forget_rate,
        num_gradual=10,
        exponent=1,
        divide_twice=False,
        **kwargs,
    ):
        super().__init__(net1, net2, forget_rate, num_gradual, exponent, **kwargs)
        self.divide_twice = bool(divide_twice)

    def train_log_keys(self):
        return ("forget_rate", "net2_loss")

    def network_losses(self, logits, labels, ids, epoch):
        rate, keep = self.kept(labels, epoch)
        loss_1, loss_2, _, _ = coteaching_losses(
            logits["net1"], logits["net2"], labels, keep, self.divide_twice
        )
        values = {"forget_rate": tf.cast(rate, tf.float32), "net2_loss": loss_2}
        return {"net1": loss_1, "net2": loss_2}, None, values

    def get_config(self):
        return {
            **super().get_config(),
            "divide_twice": self.divide_twice,
        }
