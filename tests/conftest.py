"""Shared test set-up: quiet TF, two logical CPU devices, tiny networks."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs make multi-replica tests possible without a GPU; this must run
# before any other TensorFlow call: once TensorFlow has set up its devices, it
# raises RuntimeError instead.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:
    pass
# In-process tests run their functions without Grappler's graph rewrites,
# which change how fast a function runs, not what it computes, and cost
# seconds at every first call of the many functions a test builds (a dry run
# of a ResNet flag file: 25 s with them, 19 s without). The CLI tests'
# subprocesses keep TensorFlow's default optimiser, so the path users run is
# still covered.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def tiny_net(name, input_shape=(4, 4, 1), num_classes=3, seed=0):
    """A few-hundred-parameter classifier with BatchNorm, outputting logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def tiny_data(n=48, num_classes=3, seed=0, shape=(4, 4, 1)):
    """Learnable tiny images: class j has a bright block at position j."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
    for j in range(num_classes):
        images[labels == j, j, :, :] = 230
    return images, labels.astype(np.int64)


def toy_npz(path, n=150, n_test=30, shape=(6, 6, 1)):
    """Writes `tiny_data` train and test splits as an `npz:` dataset at `path`;
    returns `(images, labels, test_images, test_labels)`."""
    images, labels = tiny_data(n=n, shape=shape)
    test_images, test_labels = tiny_data(n=n_test, seed=1, shape=shape)
    np.savez(
        path, x_train=images, y_train=labels, x_test=test_images, y_test=test_labels
    )
    return images, labels, test_images, test_labels


# The environment of CLI subprocesses: quiet, CPU only, no inherited cluster.
CLI_ENV = {
    **{k: v for k, v in os.environ.items() if k != "TF_CONFIG"},
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "CUDA_VISIBLE_DEVICES": "",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, cwd=REPO, timeout=600):
    """`python -m <module> <args>` in a subprocess; its `CompletedProcess`."""
    return run_python("-m", module, *args, cwd=cwd, timeout=timeout)


def run_python(*args, cwd=REPO, timeout=600):
    """`python <args>` in a subprocess with `CLI_ENV`; its `CompletedProcess`."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny():
    return tiny_net, tiny_data


def tiny_run_config(tmp_path, dataset, **overrides):
    """A `galkeras.train.TrainConfig` for a seconds-long run: 2 epochs (W = 1),
    width-4 networks, its run and export directories under `tmp_path`."""
    from galkeras import train

    values = dict(
        dataset=dataset,
        epochs=2,
        warmup_epochs=1,
        lr_decay_epochs=(),
        batch_size=10,
        backbone_width=4,
        verbose=0,
        model_dir=str(tmp_path / "run"),
        export_dir=str(tmp_path / "export"),
    )
    return train.TrainConfig(**{**values, **overrides})
