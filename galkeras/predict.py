"""Classifies new image files with an exported classifier:
`python -m galkeras.predict --model=saved_models/NAME[/VERSION] IMAGES...
--out=predictions.csv`.

`--model` is a TF Serving model base path, as `python -m galkeras.train` exports
to (`saved_models/<run>/`: its highest integer version is used), or one version
directory (`saved_models/<run>/2`). IMAGES are files, taken whatever their names,
folders, searched recursively for `.jpg`, `.jpeg`, `.png`, `.bmp` and `.gif`
files, or glob patterns (`**` for any depth), which are expanded here too for
shells that do not; their matches are taken as folders and image files are. The
images are sorted, and one given twice is classified once.

Images are decoded as training decodes them (`galkeras.image_files.decode_image`):
converted to the model's channels (greyscale is repeated into RGB, an alpha
channel is dropped) and resized to its input size. They are read and classified
`--batch_size` at a time, so memory does not grow with their number.

The CSV has `--top_k` rows per image (default 1), with the columns `path,
class_name,class_id,probability,rank`: rank 1 is the most probable class, the one
`serving_default` returns as `class_id`. `rank` is there for any `--top_k`, so
the columns do not depend on a flag. The file is written under a temporary name
and renamed into place, so a crash never leaves half a file, and an existing file
is replaced only with `--overwrite`.

The command line is checked (the images exist, the model directory holds a
version, `--out` can be written) before TensorFlow loads. A file that cannot be
decoded, or whose image cannot be converted to the model's channels, stops the
run with exit status 2, naming it; with `--skip_corrupt_images` it is left out,
and the files left out are counted and named on stderr.

Notebooks call `predict_files(model_path, paths, top_k=1)`; `find_images` expands
folders and patterns as the command line does.
"""

import concurrent.futures
import contextlib
import csv
import glob
import os
import re
import shlex
import sys
from typing import NamedTuple

import numpy as np
from absl import app, flags

from galkeras.image_files import IMAGE_EXTENSIONS, decode_image

CSV_COLUMNS = ("path", "class_name", "class_id", "probability", "rank")
# The channel counts that image files are decoded to, as for `ImageFiles`.
DECODED_CHANNELS = (1, 3)
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


class PredictError(ValueError):
    """A bad input, with a message that names it and says what to do."""


class Predictions(NamedTuple):
    """The result of `predict_files`.

    Attributes:
        paths: list of the N image paths classified, in order; skipped files are
            left out.
        class_ids: int64 `[N, top_k]`, each image's classes, most probable first.
        probabilities: float32 `[N, top_k]`, their probabilities (the
            `probabilities` output of the export's `serving_default`).
        class_names: tuple of the model's class names, indexed by class id, or
            None for an export without them.
        skipped: list of `(path, reason)` for the files that `skip_corrupt_images`
            left out.
        model_version: the SavedModel version directory that classified them.
    """

    paths: list
    class_ids: np.ndarray
    probabilities: np.ndarray
    class_names: tuple | None
    skipped: list
    model_version: str

    def rows(self):
        """The CSV rows, tuples in `CSV_COLUMNS` order, `top_k` per image.

        `class_name` is empty for an export without class names; `probability`
        is the shortest text that reads back as the same float32.
        """
        for path, ids, probabilities in zip(
            self.paths, self.class_ids, self.probabilities
        ):
            for rank, (class_id, probability) in enumerate(zip(ids, probabilities), 1):
                name = self.class_names[class_id] if self.class_names else ""
                yield path, name, int(class_id), str(probability), rank


class Classifier(NamedTuple):
    """An export loaded for `predict_files`, with what its signature does not say."""

    version_dir: str
    serving_fn: object
    image_shape: tuple
    class_names: tuple | None
    num_classes: int
    # The loaded SavedModel owns the variables `serving_fn` reads; it must live
    # as long as `serving_fn` is called.
    saved_model: object


def find_images(arguments):
    """The image files that `arguments` name, sorted, each path once.

    An argument is a file (taken whatever its name), a folder (searched
    recursively for `IMAGE_EXTENSIONS` files, following links to files but not
    to folders) or a glob pattern (`*`, `?`, `[...]`; `**` for any depth), whose
    matching folders are searched and matching files kept when they have an
    image extension.

    Returns:
        `(paths, empty)`: the paths as given (normalised), and the arguments that
        named no image file.

    Raises:
        PredictError: naming an argument that is neither an existing file or
            folder nor a glob pattern, or a folder that cannot be listed.
    """
    found = {}
    empty = []
    for argument in arguments:
        argument = os.fspath(argument)
        if os.path.isfile(argument):
            images = [argument]
        elif os.path.isdir(argument):
            images = _images_under(argument)
        elif os.path.exists(argument):
            raise PredictError(f"{argument} is neither a file nor a folder.")
        elif re.search(r"[*?[]", argument):
            images = []
            for match in sorted(glob.glob(argument, recursive=True)):
                if os.path.isdir(match):
                    images += _images_under(match)
                elif match.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(match)
        else:
            raise PredictError(f"{argument} does not exist.")
        if not images:
            empty.append(argument)
        for path in images:
            found.setdefault(os.path.abspath(path), os.path.normpath(path))
    return sorted(found.values()), empty


def _images_under(folder):
    def refuse(error):
        raise PredictError(
            f"cannot list the folder {error.filename} ({error.strerror or error})."
        )

    return [
        os.path.join(root, name)
        for root, _, names in os.walk(folder, onerror=refuse)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]


def resolve_model_version(model_path):
    """The SavedModel version directory that `model_path` names.

    Args:
        model_path: a version directory (holding `saved_model.pb`), or a TF
            Serving model base path of integer version directories, of which the
            highest number that holds a SavedModel is taken.

    Raises:
        PredictError: naming the path, when it does not exist or holds no
            SavedModel version.
    """
    path = os.path.normpath(os.fspath(model_path))
    if _is_saved_model(path):
        return path
    if not os.path.exists(path):
        raise PredictError(f"the model directory {path} does not exist.")
    versions = []
    if os.path.isdir(path):
        try:
            names = os.listdir(path)
        except OSError as error:
            raise PredictError(
                f"cannot list the model directory {path} ({error.strerror or error})."
            ) from error
        versions = [
            name
            for name in names
            if name.isascii()
            and name.isdigit()
            and _is_saved_model(os.path.join(path, name))
        ]
    if not versions:
        problem = (
            "holds no SavedModel version"
            if os.path.isdir(path)
            else "is a file, not a SavedModel folder"
        )
        raise PredictError(
            f"{path} {problem}: expected a model base path of "
            f"integer version directories ({os.path.join(path, '1', 'saved_model.pb')}"
            ", ...), as python -m galkeras.train exports to saved_models/<run>/, or "
            "one version directory holding saved_model.pb."
        )
    return os.path.join(path, max(versions, key=int))


def _is_saved_model(path):
    return any(os.path.isfile(os.path.join(path, f)) for f in SAVED_MODEL_FILES)


def check_out_path(out, overwrite=False):
    """Refuses, before any work, an `out` that `write_csv` would not write.

    Raises:
        PredictError: when `out` is a folder, exists without `overwrite`, or its
            folder does not exist or cannot be written.
    """
    out = os.fspath(out)
    if os.path.isdir(out):
        raise PredictError(
            f"--out={out} is a folder; give a file name such as "
            f"{os.path.join(out, 'predictions.csv')}."
        )
    if os.path.lexists(out) and not overwrite:
        raise PredictError(
            f"--out={out} already exists; pass --overwrite (overwrite=True in "
            "Python) to replace it, or choose another --out."
        )
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise PredictError(
            f"--out={out}: the folder {folder} does not exist; create it first."
        )
    probe = _partial_path(out)
    try:
        with open(probe, "x"):
            pass
        os.remove(probe)
    except OSError as error:
        raise PredictError(
            f"--out={out}: cannot write in {folder} ({error.strerror or error}); "
            "choose another --out."
        ) from error


def _partial_path(out):
    """The temporary name that `out` is written under, beside it."""
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{name}.partial-{os.getpid()}")


def load_classifier(model_path):
    """Loads the export that `model_path` names (see `resolve_model_version`).

    Raises:
        PredictError: when the SavedModel cannot be loaded, was not written by
            `galkeras.export.export_classifier`, or takes images of a channel
            count that image files are not decoded to.
    """
    version_dir = resolve_model_version(model_path)
    import tensorflow as tf

    from galkeras import export

    try:
        saved_model = tf.saved_model.load(version_dir)
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise PredictError(
            f"cannot load the SavedModel in {version_dir}: {error}"
        ) from error
    serving_fn = saved_model.signatures.get("serving_default")
    outputs = serving_fn.structured_outputs if serving_fn is not None else {}
    image_shape = export.served_image_shape(serving_fn) if outputs else None
    if "probabilities" not in outputs or image_shape is None:
        raise PredictError(
            f"{version_dir} is not a classifier exported by galkeras: its "
            "serving_default signature lacks the probabilities output or the "
            "image check that galkeras.export.export_classifier writes."
        )
    channels = image_shape[-1]
    if channels not in DECODED_CHANNELS:
        raise PredictError(
            f"the model in {version_dir} takes {channels}-channel images, but "
            "image files are decoded to 1 (greyscale) or 3 (RGB) channels, as "
            "training decodes them; call its serving_default signature on such "
            "arrays directly."
        )
    return Classifier(
        version_dir=version_dir,
        serving_fn=serving_fn,
        image_shape=image_shape,
        class_names=export.served_class_names(serving_fn),
        num_classes=outputs["probabilities"].shape[-1],
        saved_model=saved_model,
    )


def predict_files(
    model_path,
    paths,
    top_k=1,
    batch_size=64,
    skip_corrupt_images=False,
    progress=None,
):
    """Classifies image files with a classifier that galkeras exported.

    The files are decoded as training decodes them (`image_files.decode_image`,
    converted to the model's channels and resized to its input size), and read
    and classified `batch_size` at a time.

    Args:
        model_path: a TF Serving model base path (its highest version is used)
            or one version directory.
        paths: sequence of image file paths, classified in this order
            (`find_images` expands folders and patterns).
        top_k: int, the classes kept per image, most probable first.
        batch_size: int, images decoded and classified at once.
        skip_corrupt_images: leave out files that cannot be decoded, listing
            them in `skipped`, instead of raising.
        progress: optional callable, called after each batch with the number of
            files done.

    Returns:
        `Predictions`.

    Raises:
        PredictError: naming the problem: a bad argument or model (see
            `load_classifier`), a file that cannot be decoded (unless skipped),
            or no file that could be.

    Example:

    ```python
    from galkeras import predict

    paths, _ = predict.find_images(["photos/"])
    result = predict.predict_files("saved_models/my_run", paths, top_k=3)
    result.class_ids[:, 0]  # each image's most probable class
    ```
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise PredictError("no image paths given.")
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PredictError(f"{name} must be a positive int; got {value!r}.")
    classifier = load_classifier(model_path)
    if top_k > classifier.num_classes:
        raise PredictError(
            f"top_k={top_k} exceeds the model's {classifier.num_classes} classes."
        )
    import tensorflow as tf

    *image_size, channels = classifier.image_shape
    kept, skipped, class_ids, probabilities = [], [], [], []

    def decode(path):
        return _decode_file(path, image_size, channels)

    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            images = []
            for path, (image, reason) in zip(
                batch_paths, pool.map(decode, batch_paths)
            ):
                if image is not None:
                    kept.append(path)
                    images.append(image)
                elif skip_corrupt_images:
                    skipped.append((path, reason))
                else:
                    raise PredictError(
                        f"{path}: {reason}. Remove or fix the file, or pass "
                        "--skip_corrupt_images to skip (and count) it."
                    )
            if images:
                batch = classifier.serving_fn(image=tf.constant(np.stack(images)))
                batch_probabilities = batch["probabilities"].numpy()
                # Stable, so that tied classes rank by id, as tf.argmax picks.
                order = np.argsort(-batch_probabilities, axis=-1, kind="stable")
                order = order[:, :top_k]
                class_ids.append(order.astype(np.int64))
                probabilities.append(
                    np.take_along_axis(batch_probabilities, order, axis=-1)
                )
            if progress is not None:
                progress(start + len(batch_paths))
    if not kept:
        raise PredictError(
            f"none of the {len(paths)} files could be decoded, e.g. "
            f"{skipped[0][0]}: {skipped[0][1]}."
        )
    return Predictions(
        paths=kept,
        class_ids=np.concatenate(class_ids),
        probabilities=np.concatenate(probabilities),
        class_names=classifier.class_names,
        skipped=skipped,
        model_version=classifier.version_dir,
    )


def _decode_file(path, image_size, channels):
    """`(image, None)`, the uint8 image as a NumPy array, or `(None, reason)`."""
    import tensorflow as tf

    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as error:
        return None, f"cannot read it ({error.strerror or error})"
    if not contents:
        return None, "the file is empty"
    try:
        return decode_image(contents, image_size, channels).numpy(), None
    except tf.errors.InvalidArgumentError as error:
        reason = _op_message(error)
    try:
        own = tf.io.decode_image(contents, expand_animations=False).shape[-1]
    except tf.errors.InvalidArgumentError:
        return None, f"cannot decode it as an image ({reason})"
    return None, (
        f"its {own}-channel image cannot be converted to the {channels} "
        f"channel(s) the model takes, as training would not convert it ({reason})"
    )


def _op_message(error):
    """A TensorFlow op error's message without the op's name and device."""
    message = re.sub(r"\{\{.*?\}\}\s*", "", error.message)
    message = re.sub(r"\s*\[Op:.*", "", message, flags=re.DOTALL)
    return message.strip().rstrip(".")


def write_csv(predictions, out, overwrite=False):
    """Writes `predictions` as a CSV with a header row (`CSV_COLUMNS`) to `out`.

    The file is written under a temporary name beside `out` and renamed into
    place, so `out` is never half written.

    Raises:
        PredictError: as `check_out_path`.
    """
    check_out_path(out, overwrite)
    partial = _partial_path(out)
    try:
        with open(partial, "x", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(predictions.rows())
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines the command line's flags in `flag_values` (default: absl's FLAGS)."""
    define = dict(flag_values=flag_values)
    flags.DEFINE_string(
        "model",
        None,
        "Exported model: a TF Serving base path such as saved_models/<run> (its "
        "highest version is used) or one version directory.",
        **define,
    )
    flags.DEFINE_string("out", None, "The CSV file to write.", **define)
    flags.DEFINE_integer(
        "top_k",
        1,
        "Rows per image: its most probable classes.",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_integer(
        "batch_size",
        64,
        "Images decoded and classified at once.",
        lower_bound=1,
        **define,
    )
    flags.DEFINE_bool(
        "skip_corrupt_images",
        False,
        "Leave out files that cannot be decoded (counted and named on stderr) "
        "instead of stopping.",
        **define,
    )
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", **define)
    flags.DEFINE_integer(
        "verbose",
        1,
        "1: a progress bar on stderr; 0: none.",
        lower_bound=0,
        upper_bound=1,
        **define,
    )
    flags.mark_flags_as_required(["model", "out"], flag_values=flag_values)


def parse_command_line(argv, flag_values=FLAGS):
    """Parses `argv` into `flag_values` for `app.run`; returns the program name
    and the images.

    Anything absl refuses (an unknown flag, a value out of range, a missing
    --model or --out) exits with status 2 and one line naming it.
    """
    try:
        return flag_values(argv)
    except flags.Error as error:
        message = str(error).replace("ERROR:: ", "").strip().rstrip(".")
        _fail(f"{message}. See --help for the flags.")


def main(argv, flag_values=FLAGS):
    """The command line: every check of its arguments, then `predict_files` and
    `write_csv`; a `PredictError` exits with status 2 and its message."""
    arguments = argv[1:]
    try:
        if not arguments:
            raise PredictError(
                "give the images to classify: files, folders or glob patterns."
            )
        check_out_path(flag_values.out, flag_values.overwrite)
        version_dir = resolve_model_version(flag_values.model)
        paths, empty = find_images(arguments)
        if not paths:
            raise PredictError(
                f"no image files found in {shlex.join(arguments)} (folders and "
                f"patterns are searched for {', '.join(IMAGE_EXTENSIONS)} files)."
            )
        for argument in empty:
            _note(f"warning: no image files in {argument}.")
        predictions = predict_files(
            version_dir,
            paths,
            top_k=flag_values.top_k,
            batch_size=flag_values.batch_size,
            skip_corrupt_images=flag_values.skip_corrupt_images,
            progress=_progress_bar(len(paths)) if flag_values.verbose else None,
        )
        write_csv(predictions, flag_values.out, flag_values.overwrite)
    except PredictError as error:
        _fail(str(error))
    images = len(predictions.paths)
    _note(
        f"classified {images} image{'s' * (images != 1)} with "
        f"{predictions.model_version}; wrote {flag_values.out} "
        f"(top {flag_values.top_k})."
    )
    if predictions.skipped:
        _note(
            f"skipped {len(predictions.skipped)} file(s) that could not be "
            "decoded (--skip_corrupt_images):"
        )
        for path, reason in predictions.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)


def _progress_bar(total):
    """A callable showing a `keras.utils.Progbar` on stderr (Keras writes its
    bars to stdout)."""
    import keras

    with contextlib.redirect_stdout(sys.stderr):
        bar = keras.utils.Progbar(total, unit_name="image")

    def update(done):
        with contextlib.redirect_stdout(sys.stderr):
            bar.update(done)

    return update


def _note(message):
    print(f"galkeras.predict: {message}", file=sys.stderr)


def _fail(message):
    print(f"galkeras.predict: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_main():
    # TensorFlow logs a warning line of its own for every file it cannot decode,
    # which the summary names anyway.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    app.run(main, flags_parser=parse_command_line)


if __name__ == "__main__":
    run_main()
