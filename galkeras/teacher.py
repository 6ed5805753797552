"""θC's teacher: the table of the twins' joint prediction on every training sample.

GAL's student learns from `p_joint` (Eq. 6), computed once per epoch in
inference mode on the un-augmented training images and looked up by sample id
at every student step (§3.3). `PseudoLabelTable` holds that table and its
statistics, and refreshes it in one compiled pass that writes each batch's rows
where the table lives; `predict_over` is the batched, replica-spread inference
pass that the label-issue and logging passes read on the host.
"""

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
    """Coverage and precision of the pseudo-labels, computed where the table is.

    Args:
        probabilities: float `[N, K]`, the table of `p_joint`.
        labels: int `[N]`, the annotated labels.
        clean_labels: int `[N]`, or None when they are unknown.
        epsilon: ε, the confidence threshold of a pseudo-label (Eq. 9).

    Returns:
        A float32 vector ordered as `STATISTICS`, fractions in [0, 1]:
        `pseudo_label_coverage` (share with `max p_joint > epsilon`),
        `train_label_agreement` (argmax p_joint equals the annotated label: how
        far the twins fit the noisy labels), `pseudo_label_precision`
        (confident pseudo-labels equal to the clean label; NaN when none is
        confident) and `train_clean_accuracy`; the last two NaN without clean
        labels.
    """
    predicted = tf.argmax(probabilities, axis=1, output_type=tf.int64)
    confident = tf.reduce_max(probabilities, axis=1) > epsilon

    def share(mask):
        return tf.reduce_mean(tf.cast(mask, tf.float32))

    nan = tf.constant(float("nan"), tf.float32)
    values = [share(confident), share(predicted == tf.cast(labels, tf.int64))]
    if clean_labels is None:
        return tf.stack(values + [nan, nan])
    correct = predicted == tf.cast(clean_labels, tf.int64)
    confident_count = tf.reduce_sum(tf.cast(confident, tf.float32))
    precision = tf.reduce_sum(tf.cast(correct & confident, tf.float32)) / tf.maximum(
        confident_count, 1.0
    )
    return tf.stack(
        values + [tf.where(confident_count > 0, precision, nan), share(correct)]
    )


def replica_rows(strategy, values):
    """A per-replica result of `strategy.run` as one tensor of every replica's
    rows, in cross-replica context; across workers it is gathered with a
    collective, so that every worker gets every row."""
    if strategy.extended._in_multi_worker_mode():
        return strategy.gather(values, axis=0)
    return tf.concat(strategy.experimental_local_results(values), axis=0)


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

    @tf.function(autograph=False)
    def distributed(batch):
        results = strategy.run(fn, args=(batch,))
        return tuple(replica_rows(strategy, r) for r in results)

    for batch in strategy.experimental_distribute_dataset(dataset):
        ids, outputs = distributed(batch)
        yield ids.numpy(), outputs.numpy()


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
        self._fill_functions = {}
        self._stat_functions = {}

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
        training images, and its statistics.

        Each batch is spread over the replicas by one `tf.function`, which
        writes its rows into the table where it lives: nothing returns to the
        host but the statistics. Batches hold
        `refresh_batch_size(training_set.batch_size)` images by default (at
        most N); the last is padded to the same shape (one traced shape per function,
        one XLA program) and its padding is not written.

        Returns:
            The statistics, as `statistics`.
        """
        batch_size = batch_size or refresh_batch_size(training_set.batch_size)
        table = self.ensure(training_set.num_examples, training_set.num_classes)
        dataset = sampling.inference_dataset(
            training_set.images, batch_size, pad_last=True
        )
        if self.strategy.num_replicas_in_sync > 1:
            dataset = self.strategy.experimental_distribute_dataset(dataset)
        key = (id(table), id(joint_fn))
        if key not in self._fill_functions:
            self._fill_functions = {key: self._fill_function(table, joint_fn)}
        fill = self._fill_functions[key]
        for batch in dataset:
            fill(batch)
        return self.record_statistics(training_set)

    def _fill_function(self, table, joint_fn):
        strategy = self.strategy

        # One call per batch, driven from Python: a loop over the dataset
        # inside the function runs as tf.data's reduce, whose body measured
        # twice as slow on 2 CPU cores.
        @tf.function(autograph=False)
        def fill(batch):
            ids, probs = strategy.run(joint_fn, args=(batch,))
            ids = replica_rows(strategy, ids)
            probs = replica_rows(strategy, probs)
            real = ids >= 0  # the padding of the last batch has id -1
            table.scatter_update(
                tf.IndexedSlices(
                    tf.boolean_mask(probs, real), tf.boolean_mask(ids, real)
                )
            )

        return fill

    def record_statistics(self, training_set):
        """Sets the statistics from the current table, on the device that holds
        it: one host transfer for all of them. Returns them (`statistics`)."""
        clean = training_set.clean_labels
        values = self._statistics_function(clean is not None)(
            self.table,
            tf.constant(training_set.labels, tf.int64),
            tf.constant(clean if clean is not None else [], tf.int64),
        ).numpy()
        known = STATISTICS if clean is not None else STATISTICS[:2]
        self.statistics = {key: float(values[i]) for i, key in enumerate(known)}
        return self.statistics

    def _statistics_function(self, with_clean):
        if with_clean not in self._stat_functions:

            @tf.function(autograph=False)
            def statistics(table, labels, clean_labels):
                values = pseudo_label_statistics(
                    table, labels, clean_labels if with_clean else None, self.epsilon
                )
                for i, key in enumerate(STATISTICS):
                    self._statistics[key].assign(values[i])
                return values

            self._stat_functions[with_clean] = statistics
        return self._stat_functions[with_clean]

    def logs(self):
        """The statistics the run records, as tensors (those known to it)."""
        return {key: self._statistics[key].value() for key in self.statistics}


def refresh_batch_size(batch_size):
    """The refresh's default batch: four training batches, at least 512.
    Inference keeps no activations for a backward pass, so a batch this size
    needs less memory than a training step, and large batches run faster."""
    return max(4 * int(batch_size), 512)
