"""`CoTeachingPlus`: Co-teaching inside the networks' disagreement set."""

import keras
import tensorflow as tf

from galkeras.gated_update import all_replicas_finite
from galkeras.methods.coteaching import CoTeaching
from galkeras.methods.peer_losses import coteaching_losses, coteaching_plus_losses


@keras.saving.register_keras_serializable(package="galkeras")
class CoTeachingPlus(CoTeaching):
    """Co-teaching+ (Yu et al., ICML 2019; https://github.com/xingruiyu/coteaching_plus).

    Plain Co-teaching before `init_epoch`; from then on the small-loss exchange
    runs inside the disagreement set D = {i : argmax z¹ᵢ ≠ argmax z²ᵢ}, keeping
    `int(R(e) · |D|)` samples (`peer_losses.coteaching_plus_losses`). A batch
    whose D is empty (on every replica) moves neither network's weights:
    not even momentum or weight decay act (BatchNorm statistics do, since the
    forward pass in training mode ran, as in the official code). Net 1 is
    reported.

    Args:
        net1, net2, forget_rate, num_gradual, exponent, divide_twice: as
            `CoTeaching`.
        init_epoch: the first epoch of disagreement (official `main.py`: 20 for
            CIFAR-10, 5 for CIFAR-100, 0 for MNIST).
        softmax_twice: the official loss's cross entropy of softmax
            probabilities instead of logits after `init_epoch`; default off.
        **kwargs: `NoisyLabelMethod`'s.
    """

    def __init__(
        self, net1, net2, forget_rate, init_epoch=20, softmax_twice=False, **kwargs
    ):
        super().__init__(net1, net2, forget_rate, **kwargs)
        self.init_epoch = int(init_epoch)
        self.softmax_twice = bool(softmax_twice)

    def train_log_keys(self):
        return (*super().train_log_keys(), "updated_batches")

    def network_losses(self, logits, labels, ids, epoch):
        rate, keep = self.kept(labels, epoch)
        z1, z2 = logits["net1"], logits["net2"]

        def coteaching():
            loss_1, loss_2, _, _ = coteaching_losses(
                z1, z2, labels, keep, self.divide_twice
            )
            return loss_1, loss_2, tf.constant(True)

        def disagreement():
            loss_1, loss_2, _, _, update = coteaching_plus_losses(
                z1, z2, labels, 1.0 - rate, self.divide_twice, self.softmax_twice
            )
            return loss_1, loss_2, update > 0

        loss_1, loss_2, update = tf.cond(
            epoch < self.init_epoch, coteaching, disagreement
        )
        # The step is skipped only where no replica has a disagreement, so that
        # every replica takes the same path.
        update = tf.logical_not(all_replicas_finite(tf.logical_not(update)))
        values = {
            "forget_rate": tf.cast(rate, tf.float32),
            "net2_loss": loss_2,
            "updated_batches": tf.cast(update, tf.float32),
        }
        return {"net1": loss_1, "net2": loss_2}, update, values

    def get_config(self):
        return {
            **super().get_config(),
            "init_epoch": self.init_epoch,
            "softmax_twice": self.softmax_twice,
        }
