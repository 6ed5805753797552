"""The pseudo-label table: its statistics against a NumPy reference, and the
compiled refresh pass against the twins' softmax computed directly."""

import threading
from traceback import extract_stack

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data, tiny_net
from tensorflow.python.framework import ops

from galkeras import GAL, TrainingSet, optimizers, teacher


def numpy_statistics(probs, labels, clean, epsilon):
    """By hand: the shares of confident rows, of argmax == label, and of
    argmax == clean label among the confident rows and among all."""
    predicted = probs.argmax(1)
    confident = probs.max(1) > epsilon
    out = [confident.mean(), (predicted == labels).mean()]
    if clean is None:
        return out + [np.nan, np.nan]
    correct = predicted == clean
    precision = correct[confident].mean() if confident.any() else np.nan
    return out + [precision, correct.mean()]


@pytest.mark.parametrize("epsilon", [0.5, 0.95])
def test_statistics_match_a_numpy_reference(epsilon):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=50).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    clean = rng.integers(0, 4, 50)
    for known in (clean, None):
        got = teacher.pseudo_label_statistics(probs, labels, known, epsilon).numpy()
        np.testing.assert_allclose(
            got, numpy_statistics(probs, labels, known, epsilon), rtol=1e-6
        )
    # At 0.95 no row is confident: the precision is undefined (NaN), not 0.
    assert np.isnan(got[2]) and np.isnan(got[3])


def test_compiled_refresh_fills_every_row_and_reads_the_host_once(monkeypatch):
    # 22 images at batch 8: the last batch holds 6 rows and 2 of padding (id -1,
    # which the table's scatter would refuse if it were written).
    images, labels = tiny_data(22)
    gal = GAL(
        tiny_net("twin_a"),
        tiny_net("twin_b", seed=1),
        tiny_net("student"),
        warmup_epochs=0,
    )
    gal.compile(optimizer=optimizers.SGD(0.1))
    gal.twins_split.assign(1)  # after the split: θB's own forward pass
    training_set = TrainingSet(images, labels, batch_size=4, clean_labels=labels)
    gal.refresh_pseudo_labels(training_set, batch_size=8)  # traces
    gal.pseudo_labels.assign(tf.zeros_like(gal.pseudo_labels))

    reads = []
    main = threading.get_ident()
    real_numpy = ops._EagerTensorBase._numpy

    def counted(tensor):
        # Reads on the main thread, but tf.data's own at building the pipeline
        # (its batch op reads its `drop_remainder` constant).
        building = any("tensorflow/python/data/" in f for f, *_ in extract_stack())
        if threading.get_ident() == main and not building:
            reads.append(tensor.shape)
        return real_numpy(tensor)

    monkeypatch.setattr(ops._EagerTensorBase, "_numpy", counted)
    statistics = gal.refresh_pseudo_labels(training_set, batch_size=8)
    monkeypatch.undo()
    assert reads == [tf.TensorShape([4])]  # the four statistics, once

    x = images.astype(np.float32)
    p_a = tf.nn.softmax(gal.twin_a(x, training=False)).numpy()
    p_b = tf.nn.softmax(gal.twin_b(x, training=False)).numpy()
    table = gal.pseudo_labels.numpy()
    np.testing.assert_allclose(table, (p_a + p_b) / 2, atol=1e-6)
    expected = numpy_statistics(table, labels, labels, gal.epsilon)
    assert list(statistics) == list(teacher.STATISTICS)
    np.testing.assert_allclose(list(statistics.values()), expected, rtol=1e-6)
    logged = {k: v.numpy() for k, v in gal.teacher.logs().items()}
    np.testing.assert_allclose(list(logged.values()), expected, rtol=1e-6)
