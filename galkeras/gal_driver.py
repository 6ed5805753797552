"""`GALDriver`: what GAL does between epochs, as a Keras callback.

`GAL.fit` installs it. At the start of every epoch it enters the epoch's phase
(splitting θB off θA at the warm-up switch, §4.4) and refreshes θC's teacher
table (§3.3); at the start of each Keras `fit` it points the CDAS stream and
the run step at that fit's first step. It keeps no count of its own: the train
step advances `GAL.run_step`, which checkpoints save.
"""

import keras


class GALDriver(keras.callbacks.Callback):
    """Moves GAL's phase and teacher table from epoch to epoch.

    Args:
        gal: the `GAL` being trained.
        training_set: its `galkeras.TrainingSet`.
        sampler: the `CDASSampler` of the run's stream.
        resume_step: the global step the run resumes at (0 for a new run); a
            step inside an epoch keeps the restored table for that epoch.
    """

    def __init__(self, gal, training_set, sampler, resume_step=0):
        super().__init__()
        self._gal = gal
        self._training_set = training_set
        self._sampler = sampler
        self._resume_step = int(resume_step)
        self._start_step = 0
        self._started = False

    def start_step(self):
        """The first global step of the current Keras `fit` (the stream's)."""
        return self._start_step

    def on_train_begin(self, logs=None):
        # Every Keras fit opens a new stream iterator (GAL.fit may run two).
        self._started = False

    def on_epoch_begin(self, epoch, logs=None):
        steps = self._training_set.steps_per_epoch
        mid_epoch = epoch * steps < self._resume_step < (epoch + 1) * steps
        if not self._started:
            # The first epoch of this fit: `initial_epoch`, or where Keras'
            # `BackupAndRestore` resumed. The stream opens after this call.
            self._start_step = self._resume_step if mid_epoch else epoch * steps
            self._gal.run_step.assign(self._start_step)
            self._started = True
        self._gal.enter_epoch(epoch)
        self._gal.variable_open_fraction.reset_state()
        if mid_epoch:
            # The table was restored with the run: it is this epoch's.
            self._gal.teacher.record_statistics(self._training_set)
        else:
            self._gal.refresh_pseudo_labels(self._training_set)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            # The stream's count, which only the stream knows (this process's).
            logs["cdas_fallbacks"] = float(self._sampler.fallback_count)
