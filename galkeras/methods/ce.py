"""`CE`: one network trained with plain cross entropy on the noisy labels."""

import keras

from galkeras.methods.base import NoisyLabelMethod


@keras.saving.register_keras_serializable(package="galkeras")
class CE(NoisyLabelMethod):
    """Cross entropy on the noisy labels: the baseline every method must beat.

    One network, one optimizer, the mean cross entropy of each batch. No twin,
    no θC, no pseudo-label refresh: its cost is one network's. Early-stopped CE
    (CE at the epoch a noisy held-out split selects) is the control a
    practitioner already has.

    Args:
        net: `keras.Model` mapping raw images to logits.
        **kwargs: `NoisyLabelMethod`'s (`on_nonfinite`).

    Example:
    ```python
    ce = galkeras.methods.CE(make_net("net"))
    ce.compile(optimizer=galkeras.optimizers.SGD(0.05, momentum=0.9))
    ce.fit(x_train, noisy_labels, batch_size=64, epochs=10)
    ```
    """

    NETWORKS = ("net",)
    REPORTED = "net"

    def network_losses(self, logits, labels, ids, epoch):
        loss = keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                labels, logits["net"], from_logits=True
            )
        )
        return {"net": loss}, None, {}
