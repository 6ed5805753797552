"""The peer methods as Keras models: their steps against CE's, the forget-rate
schedule in the graph, resume, and `.keras` files."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_data, tiny_net

from galkeras import methods


def _compiled(method, lr=0.1, momentum=0.0):
    method.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum))
    return method


def _step_batch(n=12):
    images, labels = tiny_data(n=n)
    return {
        "image_a": tf.constant(images, tf.float32),
        "label_a": tf.constant(labels, tf.int32),
        "id_a": tf.range(n, dtype=tf.int64),
    }


def _weights(net):
    return [np.array(w) for w in net.weights]


def _one_step(method):
    method._build_optimizers()
    method.steps_per_epoch.assign(10)
    method.train_step(_step_batch())
    return method


def test_two_networks_without_selection_or_coupling_each_take_ces_step():
    # Forget rate 0 keeps every sample, and λ = 0 removes JoCoR's KL: each
    # network then takes exactly the step CE takes on it.
    ce = _one_step(_compiled(methods.CE(tiny_net("net", seed=1))))
    for method in (
        methods.CoTeaching(tiny_net("a", seed=1), tiny_net("b", seed=1), 0.0),
        methods.JoCoR(tiny_net("a", seed=1), tiny_net("b", seed=1), 0.0, co_lambda=0),
    ):
        _one_step(_compiled(method))
        for net in (method.net1, method.net2):
            for got, want in zip(_weights(net), _weights(ce.net)):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _dense_net(name):
    """A classifier without BatchNorm, whose step on a subset of a batch is a
    step on that subset alone."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inputs))
    x = keras.layers.Dense(6, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name=name)


def test_coteaching_trains_each_network_on_its_peers_selection():
    # Net 2 is a copy of net 1, so S¹ = S²: each network's step is CE's step on
    # the kept samples alone.
    method = methods.CoTeaching(_dense_net("a"), _dense_net("b"), 0.5, num_gradual=0)
    batch = _step_batch()
    z = method.net1(batch["image_a"]).numpy()
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -log_p[np.arange(12), batch["label_a"].numpy()]
    kept = np.argsort(ce, kind="stable")[:6]  # int((1 - 0.5) * 12)
    _one_step(_compiled(method))
    reference = _compiled(methods.CE(_dense_net("net")))
    reference._build_optimizers()
    reference.train_step({k: tf.gather(v, kept) for k, v in batch.items()})
    for net in (method.net1, method.net2):
        for got, want in zip(_weights(net), _weights(reference.net)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_coteaching_plus_moves_nothing_when_the_networks_agree_everywhere():
    # Identical networks never disagree: D is empty, and the step moves no
    # weight and no optimizer slot. (BatchNorm statistics move, as
    # the forward pass in training mode ran, in the official code too.)
    method = methods.CoTeachingPlus(
        tiny_net("a", seed=1), tiny_net("b", seed=1), 0.2, init_epoch=0
    )
    _compiled(method, momentum=0.9)

    def trainable(method):
        slots = [v for update in method._updates for vs in update.slots for v in vs]
        return [np.array(w) for w in [*method.trainable_weights, *slots]]

    _one_step(method)  # builds the optimizers; nothing moves
    before = trainable(method)
    _one_step(method)
    after = trainable(method)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # The iteration counter moves on: the learning rate keeps the epoch's clock.
    assert int(method.optimizers[0].iterations.numpy()) == 2
    # Before init_epoch it is plain Co-teaching, which does move them.
    early = methods.CoTeachingPlus(
        tiny_net("a", seed=1), tiny_net("b", seed=1), 0.2, init_epoch=5
    )
    initial = np.array(early.net1.trainable_weights[0])
    _one_step(_compiled(early))
    assert not np.array_equal(np.array(early.net1.trainable_weights[0]), initial)


def test_forget_rate_of_each_epoch_follows_the_official_ramp():
    images, labels = tiny_data(n=24)
    method = _compiled(
        methods.JoCoR(tiny_net("a"), tiny_net("b", seed=1), 0.4, num_gradual=3)
    )
    history = method.fit(images, labels, batch_size=12, epochs=4, verbose=0)
    # linspace(0, 0.4, 3) = [0, 0.2, 0.4], read at entry epoch + 1.
    np.testing.assert_allclose(
        history.history["forget_rate"], [0.2, 0.4, 0.4, 0.4], rtol=1e-6
    )
    assert int(method.run_step.numpy()) == 8


@pytest.mark.parametrize("kind", ["ce", "coteaching_plus"])
def test_fit_in_two_parts_equals_fit_in_one_and_keras_files_round_trip(kind, tmp_path):
    images, labels = tiny_data(n=36)

    def make():
        if kind == "ce":
            return _compiled(methods.CE(tiny_net("net")), momentum=0.9)
        return _compiled(
            methods.CoTeachingPlus(
                tiny_net("a"), tiny_net("b", seed=1), 0.3, init_epoch=1, num_gradual=2
            ),
            momentum=0.9,
        )

    whole, parts = make(), make()
    test = (images[:12], labels[:12])
    history = whole.fit(
        images, labels, batch_size=8, epochs=3, validation_data=test, verbose=0
    )
    parts.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    parts.fit(images, labels, batch_size=8, epochs=3, initial_epoch=1, verbose=0)
    for net in whole.networks:
        for a, b in zip(_weights(whole.networks[net]), _weights(parts.networks[net])):
            np.testing.assert_array_equal(a, b)
    expected = [f"val_{n}_accuracy" for n in whole.networks]
    if kind != "ce":
        expected.append("val_joint_accuracy")
    assert set(expected) <= set(history.history)

    path = tmp_path / "method.keras"
    whole.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(whole)
    np.testing.assert_allclose(
        loaded.predict(test[0], verbose=0), whole.predict(test[0], verbose=0), atol=1e-6
    )
    own = {k: v for k, v in whole.get_config().items() if k not in whole.networks}
    assert own.items() <= loaded.get_config().items()


def test_joint_classifier_is_the_mean_of_the_two_softmaxes():
    method = methods.CoTeaching(tiny_net("a"), tiny_net("b", seed=1), 0.2)
    images = tiny_data(n=5)[0].astype("float32")
    p1 = tf.nn.softmax(method.net1(images)).numpy()
    p2 = tf.nn.softmax(method.net2(images)).numpy()
    joint = tf.nn.softmax(method.classifier("joint")(images)).numpy()
    np.testing.assert_allclose(joint, (p1 + p2) / 2, atol=1e-6)
    assert method.classifier() is method.net1


# ------------------------------------------------------------ in the harness
def _peer_config(tmp_path, method, **overrides):
    from conftest import tiny_run_config

    # warmup_epochs is GAL's flag: the others take its default.
    values = dict(method=method, warmup_epochs=12, batch_size=128)
    return tiny_run_config(tmp_path, "digits", **{**values, **overrides})


def test_ce_is_gals_theta_a_alone_at_one_networks_cost(tmp_path):
    from conftest import tiny_run_config

    from galkeras import train
    from galkeras.datasets import load_dataset

    ce = train.run(_peer_config(tmp_path / "ce", "ce"))
    gal_ce = train.run(
        tiny_run_config(
            tmp_path / "gal",
            "digits",
            warmup_epochs=2,
            train_student=False,
            batch_size=128,
        )
    )
    # The same initial weights, stream, loss and optimizer: the same network.
    history = {
        name: json_lines(tmp_path / name / "run" / "history.csv")
        for name in ("ce", "gal")
    }
    assert history["ce"]["val_net_accuracy"] == history["gal"]["val_twin_a_accuracy"]
    assert ce["net"]["last"] == gal_ce["twin_a"]["last"]
    # Nothing else is trained, evaluated or exported.
    assert set(ce) & {"twin_a", "twin_b", "joint", "student"} == set()
    assert ce["reported_network"] == "net" and ce["keras_path"].endswith("net.keras")
    # What is served is the network that was trained and reported.
    data = load_dataset("digits")
    served = tf.saved_model.load(ce["export_path"]).signatures["serving_default"]
    class_id = served(image=tf.constant(data.x_test))["class_id"].numpy()
    accuracy = 100 * np.mean(class_id == data.y_test)
    assert accuracy == pytest.approx(ce["net"]["last"], abs=1e-3)


def json_lines(path):
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {key: [row[key] for row in rows] for key in rows[0]}


def test_each_peer_serves_the_network_its_summary_reports(tmp_path):
    from galkeras import train
    from galkeras.datasets import load_dataset

    data = load_dataset("digits")
    for method in ("coteaching", "coteaching_plus", "jocor"):
        extra = {"init_epoch": 0} if method == "coteaching_plus" else {}
        summary = train.run(_peer_config(tmp_path / method, method, epochs=1, **extra))
        served = tf.saved_model.load(summary["export_path"]).signatures[
            "serving_default"
        ]
        class_id = served(image=tf.constant(data.x_test))["class_id"].numpy()
        accuracy = 100 * np.mean(class_id == data.y_test)
        assert summary["reported_network"] == "net1"
        assert accuracy == pytest.approx(summary["net1"]["last"], abs=1e-3), method
        # Its label issues are scored with the joint prediction, one row each.
        issues = summary["label_issues"]
        assert issues["probabilities"] == "joint"
        with open(issues["path"]) as f:
            assert len(f.readlines()) == 1 + summary["train_examples"]


def test_flags_of_other_methods_and_bad_forget_rates_are_refused():
    from galkeras import train

    def problems(**values):
        return train.config_problems(train.TrainConfig(**values))

    assert problems(method="jocor", tau=0.5) == [
        "--tau does not apply to --method=jocor (only to gal); remove it."
    ]
    assert problems(method="gal", co_lambda=0.5) == [
        "--co_lambda does not apply to --method=gal (only to jocor); remove it."
    ]
    assert "(only to coteaching_plus)" in problems(method="ce", init_epoch=3)[0]
    (problem,) = problems(method="sgd")
    assert problem.startswith("--method='sgd' is unknown; choose one of")
    assert problems(method="coteaching", forget_rate=1.0) == [
        "--forget_rate=1.0 must be in [0, 1)."
    ]
    (problem,) = problems(method="jocor", dataset="cifar10n", noise_type="worse")
    assert "pass --forget_rate" in problem
    assert not problems(
        method="jocor", dataset="cifar10n", noise_type="worse", forget_rate=0.4
    )
    # Animal-10N, Clothing1M and a user's own labels train with no synthetic
    # noise: their noise rate is unknown too.
    for dataset in ("animal10n", "clothing1m", "folder:/images"):
        (problem,) = problems(method="coteaching", dataset=dataset, noise_type="none")
        assert "--noise_type=none leaves the labels as given" in problem
        assert "pass --forget_rate" in problem
    assert not problems(method="coteaching", noise_type="none", forget_rate=0.0)
    assert not problems(method="ce", dataset="animal10n", noise_type="none")
    # The default forget rate: the noise rate, halved for asym.
    rate = train.method_forget_rate
    assert rate(train.TrainConfig(noise_type="sym", noise_rate=0.5)) == 0.5
    assert rate(train.TrainConfig(noise_type="asym", noise_rate=0.4)) == 0.2
    assert rate(train.TrainConfig(noise_type="none", forget_rate=0.1)) == 0.1


@pytest.mark.parametrize(
    "method, options",
    [
        ("ce", dict(epochs=1)),
        ("coteaching", dict(epochs=1)),
        # Stopped in its disagreement phase, which starts at epoch 1.
        ("coteaching_plus", dict(epochs=2, init_epoch=1)),
        ("jocor", dict(epochs=1)),
    ],
)
def test_each_peer_stopped_mid_epoch_resumes_to_the_same_weights(
    tmp_path, monkeypatch, method, options
):
    from galkeras import checkpointing, train

    def final_state(run_dir):
        reader = tf.train.load_checkpoint(str(run_dir / "run" / "checkpoints"))
        return {
            name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
        }

    # digits at batch 256: 6 steps per epoch; checkpoints at steps 3 and 6.
    options = dict(options, checkpoint_every_steps=3, batch_size=256)
    stop_at = 6 * (options["epochs"] - 1) + 5  # two steps after a checkpoint
    straight = train.run(_peer_config(tmp_path / "a", method, **options))
    stopped = _peer_config(tmp_path / "b", method, **options)
    real = checkpointing.CheckpointCallback.on_train_batch_end

    def stop_mid_epoch(self, batch, logs=None):
        real(self, batch, logs)
        if self.gal.global_step == stop_at:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(
            checkpointing.CheckpointCallback, "on_train_batch_end", stop_mid_epoch
        )
        with pytest.raises(KeyboardInterrupt):
            train.run(stopped)
    resumed = train.run(stopped)
    assert resumed["resumed_from_step"] == stop_at - 2
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    reported = "net" if method == "ce" else "net1"
    assert resumed[reported] == straight[reported]


def test_the_cli_knows_every_method_and_each_peer_takes_its_flags():
    import inspect

    from galkeras import train

    assert set(train.METHODS) == {"gal", *methods.BY_NAME}
    for name, kind in methods.BY_NAME.items():
        own = [f for f in train.METHOD_FLAGS[name] if f not in train._SMALL_LOSS]
        accepted = set()
        for cls in kind.__mro__:
            if "__init__" in vars(cls):
                accepted |= set(inspect.signature(cls.__init__).parameters)
        assert set(own) <= accepted, name
        small_loss = issubclass(kind, methods.SmallLossMethod)
        assert small_loss == ("forget_rate" in train.METHOD_FLAGS[name]), name


def test_a_dry_run_of_coteaching_plus_reaches_its_disagreement_phase():
    from galkeras import train

    config = train.TrainConfig(method="coteaching_plus", epochs=200, init_epoch=20)
    dry = train.dry_run_config(config)
    assert (dry.epochs, dry.init_epoch) == (2, 1)
    short = train.dry_run_config(train.TrainConfig(method="jocor", epochs=5))
    assert short.epochs == 2


@pytest.mark.parametrize("kind", ["gal", "coteaching"])
def test_evaluation_counts_each_image_once_despite_the_padded_last_batch(kind):
    from galkeras import GAL, sampling

    images, labels = tiny_data(n=10)
    labels[::3] = (labels[::3] + 1) % 3  # some wrong, so accuracies differ
    if kind == "gal":
        method = GAL(
            tiny_net("twin_a"), tiny_net("b", seed=1), tiny_net("c", seed=2), 0
        )
        method.twins_split.assign(1)
        networks = {"twin_a": method.twin_a, "twin_b": method.twin_b}
        reported = method.student
        networks["student"] = reported
    else:
        method = methods.CoTeaching(tiny_net("a"), tiny_net("b", seed=1), 0.2)
        networks = dict(method.networks)
        reported = method.classifier()
    _compiled(method)
    # Batches of 4: 4 + 4 + 2, the last padded with 2 rows of weight 0.
    got = method.evaluate(
        sampling.evaluation_dataset(images, labels, 4), verbose=0, return_dict=True
    )
    x = images.astype("float32")
    probs = {
        n: tf.nn.softmax(net(x, training=False)).numpy() for n, net in networks.items()
    }
    probs["joint"] = (probs[[*networks][0]] + probs[[*networks][1]]) / 2
    for name, p in probs.items():
        accuracy = np.mean(p.argmax(1) == labels)
        np.testing.assert_allclose(got[f"{name}_accuracy"], accuracy, rtol=1e-6)
    p = tf.nn.softmax(reported(x, training=False)).numpy()
    loss = -np.mean(np.log(p[np.arange(10), labels]))
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
