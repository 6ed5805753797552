"""Exports θC as a versioned SavedModel for TF Serving.

The export directory is treated as a TF Serving *model base path*: each export
writes the next integer version below it (`<base>/1`, `<base>/2`, …), and an
existing version is never overwritten.
"""

import json
import math
import os
import re
import shutil
import tempfile
import zipfile

import keras
import tensorflow as tf


def next_version(base_path):
    """The next free integer version under `base_path` (1 when there is none)."""
    if not os.path.isdir(base_path):
        return 1
    versions = [int(n) for n in os.listdir(base_path) if re.fullmatch(r"\d+", n)]
    return max(versions, default=0) + 1


def check_export_base(base_path):
    """Fails early, before training, if `base_path` cannot hold a new version."""
    probe_dir = base_path
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(os.path.abspath(probe_dir))
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise ValueError(f"--export_dir {base_path}: {probe_dir} is not a directory.")
    try:
        write_probe(probe_dir)
    except OSError as error:
        raise ValueError(
            f"--export_dir {base_path}: {probe_dir} is not writable "
            f"({error.strerror or error}); choose a writable --export_dir."
        ) from error


def write_probe(directory):
    """Writes and removes a small file in `directory`, raising `OSError` if it
    cannot: a real write, since `os.access` says yes to root even on a read-only
    mount."""
    probe = os.path.join(directory, f".galkeras-probe-{os.getpid()}")
    with open(probe, "w") as f:
        f.write("probe")
    os.remove(probe)


def export_classifier(model, base_path, class_names=None, temperature=1.0):
    """Writes `model` (a logits classifier) as the next version under `base_path`.

    The `serving_default` signature takes raw images under the input name
    `image` (uint8 `[N, H, W, C]`, any batch size including 0; preprocessing is
    inside the model) and returns `probabilities` (float32 `[N, K]`,
    `softmax(logits / temperature)`), `class_id` (int64 `[N]`, the argmax of the
    logits, which no temperature changes) and, when `class_names` are given,
    `class_name` (string `[N]`). An `image` of another rank or image size is
    refused in the graph with `InvalidArgumentError`, naming the expected and
    the received shape.

    The temperature is a constant of the served graph (the run's summary.json
    records it); the model itself is left as it is.

    The version is written to a temporary directory beside it and renamed into
    place, so a crash never leaves a half-written version, and an existing
    version is never replaced.

    Returns:
        The path of the written version directory.
    """
    if not 0 < float(temperature) < math.inf:
        raise ValueError(
            f"temperature must be a finite number > 0; got {temperature!r}."
        )
    image_shape = tuple(model.input_shape[1:])
    num_classes = model.output_shape[-1]
    names = tf.constant(list(class_names)) if class_names else None
    temperature = float(temperature)

    def serve(image):
        image = checked_image_batch(image, image_shape)
        # oneDNN's convolution returns a wrongly shaped tensor for 0 images, which
        # the next BatchNorm refuses; an empty batch needs no model anyway.
        logits = tf.cond(
            tf.shape(image)[0] > 0,
            lambda: tf.cast(
                model(tf.cast(image, tf.float32), training=False), tf.float32
            ),
            lambda: tf.zeros([0, num_classes], tf.float32),
        )
        probabilities = tf.nn.softmax(logits / temperature, axis=-1)
        class_id = tf.argmax(logits, axis=-1, output_type=tf.int64)
        outputs = {"probabilities": probabilities, "class_id": class_id}
        if names is not None:
            outputs["class_name"] = tf.gather(names, class_id)
        return outputs

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        # Declared with an open shape: a declared [None, H, W, C] is trusted as
        # given, so the graph would fold the rank check away and feed whatever
        # comes to the model. `serve` checks the shape itself.
        input_signature=[tf.TensorSpec(None, tf.uint8, name="image")],
    )
    os.makedirs(base_path, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=base_path)
    try:
        archive.write_out(staging, verbose=False)
        while True:
            target = os.path.join(base_path, str(next_version(base_path)))
            try:
                # os.rename refuses to replace a non-empty directory, so a
                # version that appeared meanwhile is never overwritten.
                os.rename(staging, target)
                return target
            except OSError:
                if not os.path.isdir(target):
                    raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


# The start of `checked_image_batch`'s refusal, which `served_image_shape` also
# reads back from an export's graph.
_SHAPE_MESSAGE = "image must be uint8 [N, {expected}]; received shape ["


def checked_image_batch(image, image_shape):
    """`image` with the static shape `[None, *image_shape]`, once a graph check
    has found that it has that shape; otherwise an `InvalidArgumentError` that
    names the expected and the received shape.

    The check runs in the graph, where TF Serving calls it: a SavedModel
    signature does not check the shapes it is fed, and oneDNN's convolution
    aborts the whole process on an image without a batch axis.
    """
    shape = tf.shape(image, out_type=tf.int64)
    expected = ", ".join(str(d) for d in image_shape)
    received = tf.strings.reduce_join(tf.strings.as_string(shape), separator=", ")
    message = tf.strings.join([_SHAPE_MESSAGE.format(expected=expected), received, "]"])
    has_rank = tf.equal(tf.size(shape), len(image_shape) + 1)
    # Slicing the shape of an image of another rank would fail with a message of
    # its own, so the sizes are compared only once the rank is right.
    has_shape = tf.cond(
        has_rank,
        lambda: tf.reduce_all(tf.equal(shape[1:], image_shape)),
        lambda: tf.constant(False),
    )
    with tf.control_dependencies([tf.debugging.Assert(has_shape, [message])]):
        return tf.ensure_shape(tf.identity(image), (None, *image_shape))


def served_image_shape(serving_fn):
    """The `(H, W, C)` images that an export's `serving_default` accepts.

    The signature declares `image` with an open shape (see `export_classifier`),
    so the shape is read from the check that `checked_image_batch` put in the
    graph: the one constant that starts its refusal message.

    Args:
        serving_fn: the loaded signature,
            `tf.saved_model.load(path).signatures["serving_default"]`.

    Returns:
        A tuple of three ints, or None for a SavedModel that `export_classifier`
        did not write.
    """
    pattern = re.escape(_SHAPE_MESSAGE).replace(
        re.escape("{expected}"), r"(\d+), (\d+), (\d+)"
    )
    graph_def = serving_fn.graph.as_graph_def()
    nodes = [*graph_def.node]
    for function in graph_def.library.function:
        nodes += function.node_def
    for node in nodes:
        if node.op != "Const" or node.attr["dtype"].type != tf.string.as_datatype_enum:
            continue
        for value in node.attr["value"].tensor.string_val:
            match = re.fullmatch(pattern, value.decode("utf-8", "replace"))
            if match:
                return tuple(int(d) for d in match.groups())
    return None


def served_class_names(serving_fn):
    """The class names, indexed by class id, that an export's `class_name`
    output is gathered from; None for an export without class names.

    `serving_default` returns the name of the most probable class only; the
    whole list is the one string tensor of K names that the signature captured.

    Args:
        serving_fn: the loaded signature, as for `served_image_shape`.
    """
    outputs = serving_fn.structured_outputs
    if "class_name" not in outputs or "probabilities" not in outputs:
        return None
    num_classes = outputs["probabilities"].shape[-1]
    names = [
        t
        for t in serving_fn.captured_inputs
        if t.dtype == tf.string and t.shape.as_list() == [num_classes]
    ]
    if len(names) != 1:
        return None
    return tuple(name.decode("utf-8") for name in names[0].numpy())


def load_keras_model(path):
    """Loads a `.keras` file (such as a run's `student.keras`) in Keras' safe mode.

    Safe mode refuses to deserialise Python code (a `Lambda` layer's bytecode),
    so a `.keras` file from elsewhere cannot run code on load. galkeras' own
    layers and models are registered Keras objects and load without it.

    Raises:
        ValueError: naming the file, when it is missing, not a Keras archive, or
            holds code that safe mode refuses.
    """
    # Registers galkeras' layers, models and optimizers with Keras.
    from galkeras import backbones, distill, model, optimizers  # noqa: F401

    path = os.fspath(path)
    if not path.endswith(".keras") or not os.path.isfile(path):
        raise ValueError(f"{path} is not an existing .keras file.")
    # Keras reports a file that is not a zip archive as "File not found".
    if os.path.getsize(path) == 0:
        raise not_a_keras_archive(path, "the file is empty")
    if not zipfile.is_zipfile(path):
        raise not_a_keras_archive(path, "it is not a zip archive")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        # A zip archive without Keras' config.json, or with a damaged one.
        reason = error.args[0] if isinstance(error, KeyError) else error
        raise not_a_keras_archive(path, reason) from error
    except ValueError as error:
        if "safe_mode" not in str(error):
            raise ValueError(f"{path}: {error}") from error
        raise ValueError(
            f"{path} holds Python code (a Lambda layer), which galkeras refuses to "
            "load: it would run on load. If you trust its author, load it yourself "
            "with keras.saving.load_model(path, safe_mode=False)."
        ) from error


def not_a_keras_archive(path, reason):
    """The `ValueError` for a file at `path` that is not a Keras archive."""
    return ValueError(
        f"{path} is not a Keras archive (.keras files are zip archives): {reason}; "
        "re-save the model with model.save(...)."
    )
