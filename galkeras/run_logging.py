"""Run logs: per-step values to TensorBoard and a CSV, per-epoch values to
TensorBoard (next to Keras' `CSVLogger` history), and the test split evaluated
beside a validation split.

What is logged:
- every `every_n_steps` steps, the step's own values (not epoch means): the twins'
  and θC's losses, the agreement ratio as a share of variables and of scalar
  parameters (Figure 1; with channel or element gates the first is the mean over
  variables of each one's open share), the share of variables updated, and a
  histogram of the per-variable agreement cosines (Eq. 4; with channel or element
  gates, each variable's mean coefficient); during warm-up the twins see identical
  batches, so the agreement ratio is 1 by definition (Figure 1's early plateau);
- every epoch, every value in Keras' logs: the training means, the test (or
  validation) accuracy of θA, θB, joint and θC (and, with a noisy held-out split,
  their accuracy on its noisy labels), and the pseudo-labels' coverage and, when
  clean labels are known, precision;
- optionally (`EvaluateTrainingFit`), every epoch, each network's fit of the
  training set: its accuracy against the noisy labels and the clean ones.

`steps.csv` columns: `step, epoch, phase` and the `STEP_COLUMNS`.
"""

import csv
import os

import keras
import numpy as np
import tensorflow as tf

from galkeras import sampling
from galkeras.methods.base import NoisyLabelMethod
from galkeras.model import AGREEMENT, LAST_STEP_KEYS
from galkeras.teacher import predict_over

# The scalar values of `GAL.last_step` (the per-variable vector goes to a histogram).
STEP_COLUMNS = tuple(k for k in LAST_STEP_KEYS if k != "agreement_per_variable")


class RunLogger(keras.callbacks.Callback):
    """Writes a GAL run's step and epoch values to TensorBoard and `steps.csv`.

    Between logged steps it reads nothing from the device: it knows the run
    step from `gal.host_step` (set by the fit's callback list). At a logged step
    it first checks for a non-finite step (`gal.nonfinite_stop`), so that no row
    describes a step that was held back.

    Args:
        gal: the `galkeras.GAL` model being fitted.
        log_dir: directory of the TensorBoard event files (`train/`).
        steps_csv: path of the per-step CSV, or None for none. Rows are appended,
            so a resumed run continues the file.
        every_n_steps: int >= 1, log every this many global steps; a multiple of
            the model's `steps_per_execution` (a step's own values exist only
            between calls of the train function).
    """

    def __init__(self, gal, log_dir, steps_csv=None, every_n_steps=50):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}.")
        self.gal = gal
        self.log_dir = log_dir
        self.steps_csv = steps_csv
        self.every_n_steps = int(every_n_steps)
        self._writer = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        every = self.gal.steps_per_execution
        if self.every_n_steps % every:
            raise ValueError(
                f"every_n_steps={self.every_n_steps} must be a multiple of "
                f"steps_per_execution={every}: a step's own values exist only "
                "between calls of the train function."
            )
        self._writer = tf.summary.create_file_writer(
            os.path.join(self.log_dir, "train")
        )
        if self.steps_csv and not os.path.exists(self.steps_csv):
            with open(self.steps_csv, "w", newline="") as f:
                csv.writer(f).writerow(["step", "epoch", "phase", *STEP_COLUMNS])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # The run's global step (Keras' batch index restarts in the partial
        # epoch of a resumed run).
        step = self.gal.host_step
        if step % self.every_n_steps:
            return
        self.gal.nonfinite_stop.check()
        values = {k: float(self.gal.last_step[k].numpy()) for k in STEP_COLUMNS}
        phase = self.gal.phase
        if phase != AGREEMENT:
            # Identical batches, identical gradients: every pair agrees (Figure 1).
            values.update(agreement_ratio=1.0, agreement_param_ratio=1.0)
            values.update(updated_ratio=1.0, twin_b_loss=values["twin_a_loss"])
        if not self.gal.trains_student_now:
            values["student_loss"] = float("nan")
        with self._writer.as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(f"step/{key}", value)
            if phase == AGREEMENT:
                tf.summary.histogram(
                    "step/agreement_per_variable",
                    self.gal.last_step["agreement_per_variable"],
                )
        if self.steps_csv:
            with open(self.steps_csv, "a", newline="") as f:
                csv.writer(f).writerow(
                    [
                        step,
                        self._epoch,
                        phase,
                        *(f"{values[k]:.6g}" for k in STEP_COLUMNS),
                    ]
                )

    def on_epoch_end(self, epoch, logs=None):
        with self._writer.as_default(step=epoch + 1):
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)) or getattr(value, "ndim", 1) == 0:
                    tf.summary.scalar(f"epoch/{key}", float(value))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class EvaluateTestSplit(keras.callbacks.Callback):
    """Evaluates a further split at every epoch end, beside Keras' validation
    split, and adds the results to the epoch logs under `prefix` (θA, θB, joint
    and θC accuracy, θC's loss): the test split as `test_*` when the validation
    split is a clean one, or the noisy held-out split as `heldout_*`. Put it
    before callbacks that read the logs (CSVLogger, RunLogger).

    Args:
        gal: the `galkeras.GAL` model being fitted.
        dataset: `(image, label, weight)` batches, e.g.
            `sampling.evaluation_dataset`.
        prefix: str, the prefix of the log keys.
    """

    def __init__(self, gal, dataset, prefix="test_"):
        super().__init__()
        self.gal = gal
        self.dataset = dataset
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        results = self.gal.evaluate(self.dataset, verbose=0, return_dict=True)
        if logs is not None:
            logs.update({f"{self.prefix}{k}": v for k, v in results.items()})


class EvaluateTrainingFit(keras.callbacks.Callback):
    """Measures, at every epoch end, how far each network fits the training set:
    its accuracy on the set trained on (held-out samples are not in it), un-augmented
    and in inference mode, against the noisy labels it was trained on
    (`train_noisy_<net>_accuracy`) and, when the set knows them, against the clean
    labels (`train_clean_<net>_accuracy`). This is the memorisation curve: how much
    of the label noise each network has learned.

    `<net>` is every network the method evaluates: GAL's `twin_a`, `twin_b`,
    `joint` and `student`, or a peer's `NETWORKS` (`net`; `net1`, `net2` and
    their `joint`). The joint prediction is the mean of the two networks' softmax
    outputs (Eq. 6), and GAL's θB stands for θA until the twins split, as in GAL's
    evaluation. GAL's pseudo-label refresh logs a different quantity:
    `train_label_agreement` and `train_clean_accuracy` are the joint prediction's,
    at the start of each epoch.

    One inference pass over the set per epoch computes every network's
    prediction on each batch, spread over the strategy's replicas. The pass
    reads the weights and changes nothing: no random number is drawn and no
    BatchNorm statistic moves, so a run trains the same with or without it.
    Put it before callbacks that read the logs.

    Args:
        method: the `galkeras.GAL` or `galkeras.methods.NoisyLabelMethod` being
            fitted.
        training_set: the `galkeras.TrainingSet` it is fitted on (`labels`, and
            `clean_labels` when known).
        batch_size: images per inference batch (default: the training batch
            size, at least 256).
    """

    NOISY_PREFIX = "train_noisy_"
    CLEAN_PREFIX = "train_clean_"

    def __init__(self, method, training_set, batch_size=None):
        super().__init__()
        self.method = method
        self.noisy_labels = np.asarray(training_set.labels)
        clean = training_set.clean_labels
        self.clean_labels = None if clean is None else np.asarray(clean)
        self.dataset = sampling.inference_dataset(
            training_set.images, batch_size or max(training_set.batch_size, 256)
        )
        self._predict = {}

    def _networks(self):
        """`({name: network} to run, {name: name it stands for}, the pair whose
        mean is the joint prediction or None)`."""
        method = self.method
        if isinstance(method, NoisyLabelMethod):
            networks = method.networks
            return networks, {}, tuple(networks) if len(networks) == 2 else None
        networks = {"twin_a": method.twin_a, "student": method.student}
        aliases = {"twin_b": "twin_a"}
        if int(method.twins_split.numpy()):
            networks["twin_b"], aliases = method.twin_b, {}
        return networks, aliases, ("twin_a", "twin_b")

    def predictions(self):
        """`{name: int64 [N] predicted class}` of every evaluated network over
        the training set, in its order."""
        networks, aliases, pair = self._networks()
        names = [*networks, *aliases, *(["joint"] if pair else [])]
        key = tuple(networks)
        if key not in self._predict:

            @tf.function(reduce_retracing=True, autograph=False)
            def predict(batch):
                probabilities = {
                    name: tf.nn.softmax(
                        tf.cast(net(batch["image"], training=False), "float32")
                    )
                    for name, net in networks.items()
                }
                for name, source in aliases.items():
                    probabilities[name] = probabilities[source]
                if pair:
                    first, second = (probabilities[n] for n in pair)
                    probabilities["joint"] = (first + second) / 2
                classes = [tf.argmax(probabilities[n], axis=-1) for n in names]
                return batch["id"], tf.stack(classes, axis=1)

            self._predict[key] = predict
        predicted = np.zeros((len(self.noisy_labels), len(names)), np.int64)
        strategy = self.method.distribute_strategy
        for ids, batch in predict_over(strategy, self._predict[key], self.dataset):
            predicted[ids] = batch
        return {name: predicted[:, i] for i, name in enumerate(names)}

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for name, predicted in self.predictions().items():
            logs[f"{self.NOISY_PREFIX}{name}_accuracy"] = float(
                np.mean(predicted == self.noisy_labels)
            )
            if self.clean_labels is not None:
                logs[f"{self.CLEAN_PREFIX}{name}_accuracy"] = float(
                    np.mean(predicted == self.clean_labels)
                )


def read_history_csv(path):
    """`history.csv` (Keras' `CSVLogger`) as `{column: [float per epoch]}`,
    without the `epoch` column: the whole run's history across resumes."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c != "epoch"]
    return {
        c: [float(r[c]) if r[c] != "" else float("nan") for r in rows] for c in columns
    }


def truncate_logs(model_dir, start_step, steps_per_epoch):
    """Drops the CSV rows a resumed run will write again.

    A run killed after logging an epoch or a step but before checkpointing it
    re-runs that epoch or step from the checkpoint (`start_step` global steps
    done). Rows of later epochs (`history.csv`, `agreement_per_variable.csv`) and
    steps (`steps.csv`) go; each file is rewritten under a temporary name and
    renamed. TensorBoard event files are left as they are (TensorBoard shows the
    re-run steps twice).
    """
    first_epoch = start_step // steps_per_epoch
    for name, column, keep in (
        ("history.csv", "epoch", lambda v: v < first_epoch),
        ("agreement_per_variable.csv", "epoch", lambda v: v < first_epoch),
        ("steps.csv", "step", lambda v: v <= start_step),
    ):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            continue
        index = rows[0].index(column)
        kept = [rows[0]] + [r for r in rows[1:] if keep(int(float(r[index])))]
        with open(path + ".partial", "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(path + ".partial", path)
