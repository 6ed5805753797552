"""θC's teacher: the table of the twins' joint prediction on every training sample.

GAL's student learns from `p_joint` (Eq. 6), computed once per epoch in
inference mode on the un-augmented training images and looked up by sample id
at every student step (§3.3). `PseudoLabelTable` holds that table and its
statistics; `predict_over` is the batched, replica-spread inference pass that
fills it.
"""

import numpy as np
import tensorflow as tf

from galkeras import sampling

# The table's statistics, logged every epoch (`pseudo_label_statistics`); the
# last two only when the clean labels are known.
STATISTICS = (
    "pseudo_label_coverage",
    "train_label_agreement",
    "pseudo_label_precision",
    "train_clean_accuracy",
)


def pseudo_label_statistics(probabilities, labels, clean_labels, epsilon):
    """Coverage and precision of the pseudo-labels.

    Returns a dict of fractions in [0, 1]: `pseudo_label_coverage` (share with
    `max p_joint > epsilon`), `train_label_agreement` (argmax p_joint equals the
    annotated label: how far the twins fit the noisy labels), and with clean labels
    `pseudo_label_precision` (confident pseudo-labels equal to the clean label) and
    `train_clean_accuracy`.
    """
    predicted = probabilities.argmax(axis=1)
    confident = probabilities.max(axis=1) > epsilon
    stats = {
        "pseudo_label_coverage": float(confident.mean()),
        "train_label_agreement": float((predicted == labels).mean()),
    }
    if clean_labels is not None:
        correct = predicted == clean_labels
        stats["pseudo_label_precision"] = (
            float(correct[confident].mean()) if confident.any() else float("nan")
        )
        stats["train_clean_accuracy"] = float(correct.mean())
    return stats


def predict_over(strategy, fn, dataset):
    """Yields `(ids, outputs)` NumPy batches of `fn(images)` over `dataset`'s
    elements (`{"image", "id"}`), the work spread over `strategy`'s replicas
    (and workers). Every batch is gathered from all replicas, so every worker
    sees every row.

    Args:
        strategy: the `tf.distribute.Strategy` the networks live in.
        fn: a `tf.function` of `{"image", "id"}` batches to `(ids, outputs)`.
        dataset: a batched `tf.data.Dataset`, e.g. `sampling.inference_dataset`.
    """
    if strategy.num_replicas_in_sync == 1:
        for batch in dataset:
            ids, outputs = fn(batch)
            yield ids.numpy(), outputs.numpy()
        return
    # One host holds all its replicas' results; across hosts they are gathered
    # with a collective so that every worker gets every row.
    multi_worker = strategy.extended._in_multi_worker_mode()

    @tf.function
    def distributed(batch):
        results = strategy.run(fn, args=(batch,))
        if multi_worker:
            return tuple(strategy.gather(r, axis=0) for r in results)
        return results

    for batch in strategy.experimental_distribute_dataset(dataset):
        ids, outputs = distributed(batch)
        if multi_worker:
            yield ids.numpy(), outputs.numpy()
            continue
        yield tuple(
            np.concatenate([t.numpy() for t in strategy.experimental_local_results(r)])
            for r in (ids, outputs)
        )


class PseudoLabelTable:
    """The `[N, K]` table of `p_joint` that θC's steps read, and its statistics.

    The table is a `tf.Variable` made in `strategy`'s scope, so that a run's
    checkpoint holds it (a resumed run continues mid-epoch with the epoch's
    table) and every replica reads it. The statistics of the latest table are
    scalar variables too: the train step returns them among its logs.

    Args:
        strategy: the `tf.distribute.Strategy` of the model that reads it.
        epsilon: ε, the confidence threshold of a pseudo-label (Eq. 9).
    """

    def __init__(self, strategy, epsilon):
        self.strategy = strategy
        self.epsilon = float(epsilon)
        self.table = None
        self.statistics = {}
        with strategy.scope():
            self._statistics = {
                key: tf.Variable(
                    float("nan"), trainable=False, name=key, dtype=tf.float32
                )
                for key in STATISTICS
            }

    def ensure(self, num_examples, num_classes):
        """The table (zeros) made if absent or of another shape, so that a
        checkpoint can be restored into it before the first refresh."""
        shape = (int(num_examples), int(num_classes))
        if self.table is None or tuple(self.table.shape) != shape:
            with self.strategy.scope():
                self.table = tf.Variable(
                    tf.zeros(shape, tf.float32), trainable=False, name="p_joint"
                )
        return self.table

    def lookup(self, ids):
        """The rows of sample `ids`: θC's targets (Eq. 9-11)."""
        return tf.gather(self.table, ids)

    def refresh(self, joint_fn, training_set, batch_size=None):
        """Recomputes the table with `joint_fn` (a `tf.function` of
        `{"image", "id"}` batches to `(ids, p_joint)`) over the un-augmented
        training images, and its statistics. Returns the NumPy table."""
        batch_size = batch_size or max(training_set.batch_size, 256)
        probs = np.zeros(
            (training_set.num_examples, training_set.num_classes), np.float32
        )
        dataset = sampling.inference_dataset(training_set.images, batch_size)
        for ids, batch_probs in predict_over(self.strategy, joint_fn, dataset):
            probs[ids] = batch_probs
        self.ensure(*probs.shape).assign(probs)
        self.record_statistics(training_set, probs)
        return probs

    def record_statistics(self, training_set, probs=None):
        """Sets the statistics from `probs` (default: the current table)."""
        if probs is None:
            probs = self.table.numpy()
        self.statistics = pseudo_label_statistics(
            probs, training_set.labels, training_set.clean_labels, self.epsilon
        )
        for key, value in self.statistics.items():
            self._statistics[key].assign(value)

    def logs(self):
        """The statistics the run records, as tensors (those known to it)."""
        return {key: self._statistics[key].value() for key in self.statistics}
