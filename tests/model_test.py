"""The GAL model: warm-up switch, gated updates, agreement, student, fit and save."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data, tiny_net

from galkeras import agreement, optimizers, sampling
from galkeras.gated_update import optimizer_slots
from galkeras.model import GAL
from galkeras.training_set import TrainingSet


def _gal(optimizer=None, **kwargs):
    gal = GAL(
        tiny_net("twin_a"), tiny_net("twin_b", seed=1), tiny_net("student"), **kwargs
    )
    gal.compile(optimizer=optimizer or optimizers.SGD(0.1, momentum=0.9))
    gal._build_optimizers()
    return gal


def _batch(seed_a=0, seed_b=1, n=12):
    xa, ya = tiny_data(n, seed=seed_a)
    xb, yb = tiny_data(n, seed=seed_b)
    yb = np.roll(yb, 1)  # disagreeing labels for θB
    return {
        "image_a": tf.constant(xa, tf.float32),
        "label_a": tf.constant(ya, tf.int32),
        "id_a": tf.range(n, dtype=tf.int64),
        "image_b": tf.constant(xb, tf.float32),
        "label_b": tf.constant(yb, tf.int32),
        "id_b": tf.range(n, dtype=tf.int64),
    }


def _state(gal):
    nets = {
        "a": gal.twin_a.trainable_variables,
        "b": gal.twin_b.trainable_variables,
    }
    slots = {k: u.slots for k, u in zip("ab", gal._gated_updates)}
    return {
        k: [
            (v.numpy().copy(), [s.numpy().copy() for s in sl])
            for v, sl in zip(nets[k], slots[k])
        ]
        for k in "ab"
    }


def _one_agreement_step(gal, batch):
    gal.enter_epoch(gal.warmup_epochs)
    gal.ensure_pseudo_label_table(12, 3).assign(tf.fill([12, 3], 1 / 3))
    return tf.function(gal.train_step)(batch)


def _reference_gradients(gal, batch):
    """Independent reference: each twin's CE gradients as NumPy arrays."""
    grads = {}
    for key, net in (("a", gal.twin_a), ("b", gal.twin_b)):
        with tf.GradientTape() as tape:
            # BatchNorm in training mode, as in the step; moving stats are not
            # trainable so this reference does not disturb the gradients.
            logits = net(batch[f"image_{key}"], training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    batch[f"label_{key}"], logits, from_logits=True
                )
            )
        grads[key] = [g.numpy() for g in tape.gradient(loss, net.trainable_variables)]
    return grads


def _coefficients(gal, batch):
    """Independent reference: each twin's CE gradients and their NumPy cosine."""
    cos = []
    reference = _reference_gradients(gal, batch)
    grads = {k: [g.ravel() for g in v] for k, v in reference.items()}
    for ga, gb in zip(grads["a"], grads["b"]):
        cos.append(ga @ gb / (np.linalg.norm(ga) * np.linalg.norm(gb) + 1e-12))
    return np.array(cos)


def test_warmup_switch_copies_weights_and_optimizer_state(tiny):
    gal = _gal(warmup_epochs=1)
    images, labels = tiny_data(24)
    gal.fit(TrainingSet(images, labels, batch_size=8), epochs=1, verbose=0)
    assert int(gal.twins_split.numpy()) == 0
    a_before = [w.numpy() for w in gal.twin_a.weights]
    b_before = [w.numpy() for w in gal.twin_b.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(a_before, b_before))
    gal.enter_epoch(1)
    assert int(gal.twins_split.numpy()) == 1 and gal.phase == "agreement"
    for wa, wb in zip(gal.twin_a.weights, gal.twin_b.weights):  # incl. BN stats
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    assert int(gal.optimizer_b.iterations.numpy()) == 3
    for sa, sb in zip(gal.optimizer.variables, gal.optimizer_b.variables):
        np.testing.assert_array_equal(sa.numpy(), sb.numpy())
    slots_a = gal._gated_updates[0].slots
    assert any(np.any(s.numpy() != 0) for slots in slots_a for s in slots)
    # A second switch (e.g. a resumed run) must not copy θA over θB again.
    gal.twin_b.trainable_variables[0].assign_add(
        tf.ones_like(gal.twin_b.trainable_variables[0])
    )
    gal.enter_epoch(2)
    assert not np.array_equal(
        gal.twin_a.trainable_variables[0].numpy(),
        gal.twin_b.trainable_variables[0].numpy(),
    )


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-4),
        lambda: keras.optimizers.Adam(0.01),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_skip_keeps_gated_off_variables_and_slots_bit_identical(make_optimizer):
    batch = _batch()
    gal = _gal(optimizer=make_optimizer(), warmup_epochs=0, train_student=False)
    # Give the optimizers non-zero slots first, so "unchanged" is meaningful.
    gal.enter_epoch(0)
    gal.ensure_pseudo_label_table(12, 3).assign(tf.fill([12, 3], 1 / 3))
    gal.tau = -1.0  # every gate open for the priming step
    tf.function(gal.train_step)(batch)
    coefficients = _coefficients(gal, batch)
    gal.tau = float(np.median(coefficients))  # about half the gates open
    gal.make_train_function(force=True)
    expected_open = coefficients >= gal.tau
    assert 0 < expected_open.sum() < len(expected_open)

    # Reference: the same optimizer stepping every variable, without gates.
    reference = _gal(optimizer=make_optimizer(), warmup_epochs=0, train_student=False)
    for src, dst in zip(gal.weights, reference.weights):
        dst.assign(src)
    for opt, ref in (
        (gal.optimizer, reference.optimizer),
        (gal.optimizer_b, reference.optimizer_b),
    ):
        for src, dst in zip(opt.variables, ref.variables):
            dst.assign(src)
    reference.update_rule = "all"
    reference.enter_epoch(0)
    reference.ensure_pseudo_label_table(12, 3).assign(tf.fill([12, 3], 1 / 3))

    before = _state(gal)
    tf.function(gal.train_step)(batch)
    tf.function(reference.train_step)(batch)
    after, moved = _state(gal), _state(reference)
    for key in "ab":
        for i, is_open in enumerate(expected_open):
            (v0, s0), (v1, s1), (vr, sr) = before[key][i], after[key][i], moved[key][i]
            assert s1, "every variable has an optimizer slot"
            if is_open:
                np.testing.assert_array_equal(v1, vr)
                for x, y in zip(s1, sr):
                    np.testing.assert_array_equal(x, y)
                assert not np.array_equal(v0, v1)
            else:
                assert v1.tobytes() == v0.tobytes()
                for x, y in zip(s1, s0):
                    assert x.tobytes() == y.tobytes()


def _channel_cosines(a, b):
    """NumPy cosine per slice along the last axis (one value for a scalar)."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    dot, norms = (a * b).sum(0), np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0)


def test_channel_granularity_gates_channels_and_logs_the_parameter_share():
    batch = _batch()
    gal = _gal(warmup_epochs=0, train_student=False, agreement_granularity="channel")
    assert GAL.from_config(gal.get_config()).agreement_granularity == "channel"
    gal.enter_epoch(0)  # θB := θA
    grads = _reference_gradients(gal, batch)
    cosines = [_channel_cosines(a, b) for a, b in zip(grads["a"], grads["b"])]
    gal.tau = float(np.median(np.concatenate(cosines)))
    before = _state(gal)
    _one_agreement_step(gal, batch)
    variables = gal.twin_a.trainable_variables
    sizes = np.array([np.prod(v.shape) for v in variables])
    shares = np.array([np.mean(c >= gal.tau) for c in cosines])
    last = {k: v.numpy() for k, v in gal.last_step.items()}
    np.testing.assert_allclose(
        last["agreement_param_ratio"], (shares * sizes).sum() / sizes.sum(), atol=1e-6
    )
    np.testing.assert_allclose(last["agreement_ratio"], shares.mean(), atol=1e-6)
    np.testing.assert_allclose(
        last["agreement_per_variable"], [c.mean() for c in cosines], atol=1e-5
    )
    np.testing.assert_allclose(gal.variable_open_fraction.result(), shares, atol=1e-6)
    assert 0 < last["agreement_param_ratio"] < 1
    for key in "ab":
        for (v0, s0), (v1, s1), c, g in zip(
            before[key], _state(gal)[key], cosines, grads[key]
        ):
            closed = np.broadcast_to(c < gal.tau, v0.shape)
            for old, new in zip([v0, *s0], [v1, *s1]):
                assert new[closed].tobytes() == old[closed].tobytes()
            np.testing.assert_array_equal(
                (v1 != v0)[~closed & (np.abs(g) > 1e-5)], True
            )


def test_random_rule_at_element_granularity_opens_the_same_elements_in_both_twins():
    batch = _batch()
    gal = _gal(
        optimizer=optimizers.SGD(0.1, momentum=0.0, weight_decay=0.0),
        warmup_epochs=0,
        train_student=False,
        update_rule="random",
        random_update_prob=0.5,
        agreement_granularity="element",
    )
    gal.enter_epoch(0)
    grads = _reference_gradients(gal, batch)
    variables = gal.twin_a.trainable_variables
    gates = agreement.random_unit_gates(
        [v.shape for v in variables], 0.5, tf.constant([gal.seed, 0]), "element"
    )
    before = _state(gal)
    logs = _one_agreement_step(gal, batch)
    gates = [g.numpy() for g in gates]
    # The updated ratio is the mean over variables of each one's open share.
    share = np.mean([g.mean() for g in gates])
    np.testing.assert_allclose(float(gal.last_step["updated_ratio"]), share, atol=1e-6)
    assert 0.4 < float(logs["updated_ratio"]) < 0.6
    for key in "ab":
        for (v0, _), (v1, _), gate, g in zip(
            before[key], _state(gal)[key], gates, grads[key]
        ):
            moved = v1 != v0
            assert not moved[~gate].any()
            np.testing.assert_array_equal(moved[gate & (np.abs(g) > 1e-5)], True)


def test_zero_grad_lets_momentum_and_decay_move_gated_off_variables():
    batch = _batch()
    gal = _gal(
        optimizer=optimizers.SGD(0.1, momentum=0.9, weight_decay=0.01),
        warmup_epochs=0,
        train_student=False,
        masked_update="zero_grad",
    )
    gal.enter_epoch(0)
    gal.ensure_pseudo_label_table(12, 3).assign(tf.fill([12, 3], 1 / 3))
    gal.tau = -1.0
    tf.function(gal.train_step)(batch)
    coefficients = _coefficients(gal, batch)
    gal.tau = 1.01  # close every gate
    gal.make_train_function(force=True)
    before = _state(gal)
    tf.function(gal.train_step)(batch)
    after = _state(gal)
    assert coefficients.max() < 1.01
    for i in range(len(coefficients)):
        (v0, (m0,)), (v1, (m1,)) = before["a"][i], after["a"][i]
        # PyTorch rule with a zero CE gradient: buf = mu*buf + wd*theta.
        want_m = 0.9 * m0 + 0.01 * v0
        np.testing.assert_allclose(m1, want_m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v1, v0 - 0.1 * want_m, rtol=1e-5, atol=1e-7)


def test_identical_batches_agree_fully_and_twins_stay_identical():
    gal = _gal(warmup_epochs=0, train_student=False)
    images, labels = tiny_data(24)
    gal.fit(
        TrainingSet(images, labels, batch_size=8, sampling="identical"),
        epochs=2,
        verbose=0,
    )
    history = gal.history.history
    np.testing.assert_allclose(history["agreement"], 1.0, atol=1e-5)
    np.testing.assert_allclose(history["agreement_ratio"], 1.0)
    for wa, wb in zip(gal.twin_a.weights, gal.twin_b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())


def test_measured_agreement_matches_reference_cosine():
    batch = _batch()
    gal = _gal(warmup_epochs=0, train_student=False, update_rule="all")
    gal.tau = 0.0
    want = _coefficients(_gal_copy(gal), batch)
    logs = _one_agreement_step(gal, batch)
    np.testing.assert_allclose(float(logs["agreement"]), want.mean(), atol=1e-5)
    np.testing.assert_allclose(float(logs["agreement_ratio"]), (want >= 0).mean())


def _gal_copy(gal):
    copy = _gal(warmup_epochs=gal.warmup_epochs)
    for src, dst in zip(gal.weights, copy.weights):
        dst.assign(src)
    copy.copy_twin_a_to_b()
    return copy


def test_student_step_uses_the_table_and_fit_logs_everything():
    images, labels = tiny_data(36)
    gal = _gal(warmup_epochs=1, epsilon=0.5)
    history = gal.fit(
        TrainingSet(images, labels, batch_size=12, clean_labels=labels),
        epochs=3,
        validation_data=(images, labels),
        verbose=0,
    ).history
    for key in (
        "val_twin_a_accuracy",
        "val_twin_b_accuracy",
        "val_joint_accuracy",
        "val_student_accuracy",
        "agreement_ratio",
        "agreement_param_ratio",
        "pseudo_label_coverage",
        "pseudo_label_precision",
        "loss",
    ):
        assert len(history[key]) == 3, key
    # The table is the joint softmax of the twins, in inference mode.
    gal.refresh_pseudo_labels(TrainingSet(images, labels, batch_size=12))
    probs = gal.pseudo_labels.numpy()
    p_a = tf.nn.softmax(gal.twin_a(images.astype(np.float32))).numpy()
    p_b = tf.nn.softmax(gal.twin_b(images.astype(np.float32))).numpy()
    np.testing.assert_allclose(probs, (p_a + p_b) / 2, atol=1e-6)
    np.testing.assert_allclose(
        gal.predict(images, verbose=0),
        tf.nn.softmax(gal.student(images.astype(np.float32))).numpy(),
        atol=1e-6,
    )


def test_fit_with_standard_callbacks_and_save_load_round_trip(tmp_path):
    images, labels = tiny_data(36)
    gal = _gal(warmup_epochs=1)
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras")),
        keras.callbacks.EarlyStopping(
            monitor="val_student_accuracy", mode="max", patience=5
        ),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
    ]
    gal.fit(
        TrainingSet(images, labels, batch_size=12),
        epochs=2,
        validation_data=(images, labels),
        callbacks=callbacks,
        verbose=0,
    )
    assert (tmp_path / "ckpt.keras").exists()
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    path = str(tmp_path / "gal.keras")
    gal.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, GAL) and loaded.warmup_epochs == 1
    assert int(loaded.twins_split.numpy()) == 1
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0), gal.predict(images, verbose=0)
    )
    for name in ("optimizer", "optimizer_b", "student_optimizer"):
        src, dst = getattr(gal, name), getattr(loaded, name)
        assert int(dst.iterations.numpy()) == int(src.iterations.numpy()) == 6
        for a, b in zip(src.variables, dst.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The loaded model keeps training.
    loaded.fit(
        TrainingSet(images, labels, batch_size=12), epochs=3, initial_epoch=2, verbose=0
    )


def test_backup_and_restore_resumes_at_the_saved_epoch(tmp_path):
    images, labels = tiny_data(36)
    backup = str(tmp_path / "backup")

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("simulated preemption")

    gal = _gal(warmup_epochs=1)
    with pytest.raises(RuntimeError):
        gal.fit(
            TrainingSet(images, labels, batch_size=12),
            epochs=4,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()],
        )
    resumed = _gal(warmup_epochs=1)
    seen = []
    resumed.fit(
        TrainingSet(images, labels, batch_size=12),
        epochs=4,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(backup),
            keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda e, logs: seen.append(e)
            ),
        ],
    )
    assert seen == [2, 3]
    assert int(resumed.twins_split.numpy()) == 1
    assert int(resumed.optimizer.iterations.numpy()) == 12


def test_fit_rejects_a_tf_data_dataset_and_bad_settings():
    gal = _gal(warmup_epochs=0)
    with pytest.raises(TypeError, match="TrainingSet"):
        gal.fit(tf.data.Dataset.range(3))
    with pytest.raises(ValueError, match="update_rule"):
        GAL(
            tiny_net("a"),
            tiny_net("b"),
            tiny_net("c"),
            warmup_epochs=0,
            update_rule="x",
        )
    with pytest.raises(ValueError, match="tau"):
        GAL(tiny_net("a"), tiny_net("b"), tiny_net("c"), warmup_epochs=0, tau=1.5)


def test_slot_map_finds_each_variables_slots():
    net = tiny_net("net")
    opt = keras.optimizers.Adam()
    opt.build(net.trainable_variables)
    slots = optimizer_slots(opt, net.trainable_variables)
    assert [len(s) for s in slots] == [2] * len(net.trainable_variables)
    for v, (m, u) in zip(net.trainable_variables, slots):
        assert m.shape == v.shape and "momentum" in m.name and "velocity" in u.name


def test_a_student_starting_at_the_split_waits_then_keeps_the_runs_schedule():
    images, labels = tiny_data(24)
    schedule = optimizers.piecewise_epoch_schedule(0.1, (2,), 0.1, 3)  # 3 steps/epoch
    first, split = (
        _gal(optimizers.SGD(schedule), warmup_epochs=2, student_start=start)
        for start in ("first_epoch", "split")
    )
    initial = [w.copy() for w in split.student.get_weights()]
    for gal in (first, split):
        gal.fit(TrainingSet(images, labels, batch_size=8), epochs=2, verbose=0)
    # Two warm-up epochs: θC moved from the first epoch on, or not at all.
    assert any(
        not np.array_equal(a, b) for a, b in zip(first.student.get_weights(), initial)
    )
    for a, b in zip(split.student.get_weights(), initial):
        np.testing.assert_array_equal(a, b)
    assert int(split.student_optimizer.iterations.numpy()) == 0
    # At the split θC takes θA's step count: its learning rate is the epoch's
    # (a tenth from epoch 2 on), not the first epoch's.
    split.fit(
        TrainingSet(images, labels, batch_size=8), epochs=3, initial_epoch=2, verbose=0
    )
    assert int(split.student_optimizer.iterations.numpy()) == 9
    assert any(
        not np.array_equal(a, b) for a, b in zip(split.student.get_weights(), initial)
    )
    with pytest.raises(ValueError, match="student_start must be one of"):
        _gal(warmup_epochs=1, student_start="later")


def test_fit_through_a_device_prefetch_trains_the_same_weights(monkeypatch):
    # On a GPU without a strategy the stream ends in prefetch_to_device; the
    # host stands in for the device here, through Keras' own fit loop.
    images, labels = tiny_data(24)
    weights = []
    for device in (None, "/cpu:0"):
        monkeypatch.setattr(sampling, "input_device", lambda strategy: device)
        gal = _gal(warmup_epochs=1)
        gal.fit(TrainingSet(images, labels, batch_size=8), epochs=2, verbose=0)
        weights.append([w.numpy() for w in gal.weights])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
