"""`JoCoR`: two networks trained on one shared small-loss set, co-regularised."""

import keras
import tensorflow as tf

from galkeras.methods.base import SmallLossMethod
from galkeras.methods.peer_losses import jocor_loss


@keras.saving.register_keras_serializable(package="galkeras")
class JoCoR(SmallLossMethod):
    """JoCoR (Wei et al., CVPR 2020; https://github.com/hongxin001/JoCoR).

    Per sample `ℓᵢ = (1−λ)[CE(z¹ᵢ) + CE(z²ᵢ)] + λ[KL(p²ᵢ‖p¹ᵢ) + KL(p¹ᵢ‖p²ᵢ)]`;
    one shared set S of the `int(R(e) · B)` smallest ℓ; both networks minimise
    `mean_{i∈S} ℓᵢ` (`peer_losses.jocor_loss`). The official code steps one
    optimizer over both networks; one optimizer per network with the same
    hyperparameters is the same update. Net 1 is reported.

    Args:
        net1, net2: `keras.Model`s of raw images to logits.
        forget_rate: τ_f in [0, 1) (official: the noise rate; half of it for
            CIFAR-10's asymmetric noise).
        num_gradual, exponent: the forget-rate ramp (official: 10, 1).
        co_lambda: λ (the official README's recommendation 0.9; its argparse
            default is 0.1; 0.65 at 80% noise, 0.85 for CIFAR-100).
        **kwargs: `NoisyLabelMethod`'s.
    """

    def __init__(
        self,
        net1,
        net2,
        forget_rate,
        num_gradual=10,
        exponent=1,
        co_lambda=0.9,
        **kwargs,
    ):
        super().__init__(net1, net2, forget_rate, num_gradual, exponent, **kwargs)
        if not 0.0 <= co_lambda <= 1.0:
            raise ValueError(f"co_lambda must be in [0, 1]; got {co_lambda}.")
        self.co_lambda = float(co_lambda)

    def train_log_keys(self):
        return ("forget_rate",)

    def network_losses(self, logits, labels, ids, epoch):
        rate, keep = self.kept(labels, epoch)
        loss, _ = jocor_loss(
            logits["net1"], logits["net2"], labels, keep, self.co_lambda
        )
        values = {"forget_rate": tf.cast(rate, tf.float32)}
        return {"net1": loss, "net2": loss}, None, values

    def get_config(self):
        return {**super().get_config(), "co_lambda": self.co_lambda}
