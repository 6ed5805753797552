"""Between two calls of the train function, Python reads nothing from the
device, but at a logged or checkpointed step and at the end of an epoch."""

import threading

import keras
import keras.src.backend
import numpy as np
from conftest import tiny_data, tiny_net
from tensorflow.python.framework import ops

from galkeras import GAL, TrainingSet, checkpointing, run_logging


class HostReads:
    """Records, in order, each call of a model's train function and each read
    of a device value into Python on the main thread: every `.numpy()`,
    `float()`, `int()`, `bool()` or `np.asarray` of an eager tensor or variable
    (`_numpy`), and Keras' log conversion (`convert_to_numpy`, which NumPy
    serves through the buffer protocol, past `_numpy`). Reads inside a call
    (Keras' own check that the input had data) are told apart from reads
    between calls."""

    def __init__(self, monkeypatch, model):
        self.events = []
        main = threading.get_ident()
        real_numpy = ops._EagerTensorBase._numpy
        real_convert = keras.src.backend.convert_to_numpy

        def read(where):
            if threading.get_ident() == main:  # not tf.data's threads
                self.events.append(where)

        def counted_numpy(tensor):
            read("read")
            return real_numpy(tensor)

        def counted_convert(x):
            read("read")
            return real_convert(x)

        monkeypatch.setattr(ops._EagerTensorBase, "_numpy", counted_numpy)
        monkeypatch.setattr(keras.src.backend, "convert_to_numpy", counted_convert)
        real_make = model.make_train_function

        def make_train_function(force=False):
            real_make(force)
            function = model.train_function
            if getattr(function, "counted", False):
                return function

            def train_function(iterator):
                self.events.append("call")
                try:
                    return function(iterator)
                finally:
                    self.events.append("return")

            train_function.counted = True
            model.train_function = train_function
            return train_function

        monkeypatch.setattr(model, "make_train_function", make_train_function)

    def between_calls(self):
        """`{n: reads after the n-th call returned and before the next began}`."""
        reads, calls = {}, 0
        for event in self.events:
            if event == "call":
                calls += 1
            elif event == "return":
                reads[calls] = 0
            elif calls in reads:
                reads[calls] += 1
        del reads[calls]  # after the last call: the end of the epoch
        return reads


def test_a_20_step_epoch_reads_the_device_only_at_its_logged_and_saved_steps(
    tmp_path, monkeypatch
):
    images, labels = tiny_data(200)
    gal = GAL(
        tiny_net("twin_a"), tiny_net("twin_b"), tiny_net("student"), warmup_epochs=0
    )
    gal.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    gal.ensure_pseudo_label_table(200, 3)
    training_set = TrainingSet(images, labels, batch_size=10, sampling="random")
    run = checkpointing.RunCheckpoint(gal, str(tmp_path / "checkpoints"), labels)
    saver = checkpointing.CheckpointCallback(run, gal, 20, every_n_steps=10)
    logger = run_logging.RunLogger(
        gal, str(tmp_path / "tb"), str(tmp_path / "steps.csv"), every_n_steps=5
    )
    reads = HostReads(monkeypatch, gal)
    try:
        gal.fit(training_set, epochs=1, callbacks=[logger, saver], verbose=0)
    finally:
        saver.close()

    between = reads.between_calls()
    assert sorted(between) == list(range(1, 20))  # 20 calls, one step each
    # Steps 5 and 15 are logged, step 10 logged and saved; 20 ends the epoch.
    # Before, every step read the run step twice, the non-finite counter once
    # and each of the 12 logs once.
    assert [step for step, n in between.items() if n] == [5, 10, 15]
    assert run.latest.endswith("ckpt-20")
    assert [row.split(",")[0] for row in open(tmp_path / "steps.csv")][1:] == [
        "5",
        "10",
        "15",
        "20",
    ]
    assert np.isfinite(gal.twin_a.get_weights()[0]).all()
