"""`npz:PATH`: a dataset from one NumPy `.npz` archive.

The archive holds plain arrays, written for example with

```python
np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
```

- `x_train`, `x_test`: uint8 images, `(N, H, W)` or `(N, H, W, C)`.
- `y_train`, `y_test`: integer labels, `(N,)` or `(N, 1)`, from 0 to K-1.
- `y_train_clean` (optional): the clean training labels, when `y_train` is noisy.
- `class_names` (optional): a string array (str, or UTF-8 bytes), one distinct
  name per class; it sets the number of classes K. Without it K is the largest
  label + 1 over all label arrays, and every class in [0, K) must have a
  training image: a class without one usually means a stray label, which would
  otherwise set K. A class that `class_names` declares may have no training
  image (a warning names it), but K may not exceed the number of training
  images.

Pickled (object) arrays are refused: the file is loaded with
`allow_pickle=False`, so a downloaded archive cannot run code.
"""

import os
import pathlib
import zipfile

import numpy as np
from absl import logging

from galkeras.datasets.base import Dataset, DatasetError, register

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("y_train_clean", "class_names")
LABEL_KEYS = ("y_train", "y_test", "y_train_clean")
# Every zip archive (and so every .npz) starts with one of these.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _read_arrays(path):
    """Reads the known keys of the archive at `path` into a dict."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise DatasetError(
            f"npz:{path}: the file {what}; give the path of a .npz file."
        )
    with open(path, "rb") as f:
        if f.read(4) not in _ZIP_MAGICS:
            raise DatasetError(
                f"npz:{path}: not a valid .npz archive; write it with np.savez "
                f"(a single .npy array is not enough)."
            )
        f.seek(0)
        try:
            archive = np.load(f, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            raise DatasetError(
                f"npz:{path}: not a valid .npz archive ({error}); write it with "
                f"np.savez."
            ) from error
        with archive:
            missing = [key for key in REQUIRED_KEYS if key not in archive.files]
            if missing:
                raise DatasetError(
                    f"npz:{path}: missing key {missing[0]!r}; the archive must "
                    f"hold {', '.join(REQUIRED_KEYS)} (optional: "
                    f"{', '.join(OPTIONAL_KEYS)}), found {sorted(archive.files)}."
                )
            arrays = {}
            for key in REQUIRED_KEYS + OPTIONAL_KEYS:
                if key not in archive.files:
                    continue
                try:
                    arrays[key] = archive[key]
                except ValueError as error:
                    if "pickle" not in str(error):
                        raise DatasetError(
                            f"npz:{path}: key {key!r} cannot be read ({error}); "
                            f"write the archive again with np.savez."
                        ) from error
                    raise DatasetError(
                        f"npz:{path}: key {key!r} holds an object array, which "
                        f"would need pickle; pickled data is refused "
                        f"(allow_pickle=False). Save it as a plain numeric or "
                        f"string array."
                    ) from error
                except (OSError, zipfile.BadZipFile) as error:
                    raise DatasetError(
                        f"npz:{path}: key {key!r} cannot be read ({error}); the "
                        f"archive is damaged, write it again with np.savez."
                    ) from error
    return arrays


def _class_names(arrays, path):
    """Returns the archive's class names, or None when it has none."""
    if "class_names" not in arrays:
        return None
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DatasetError(
            f"npz:{path}: class_names must be a 1-D string array, got dtype "
            f"{names.dtype} and shape {names.shape}."
        )
    if names.dtype.kind == "U":
        return tuple(str(name) for name in names)
    decoded = []
    for i, name in enumerate(names):
        try:
            decoded.append(name.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DatasetError(
                f"npz:{path}: class_names[{i}] is not UTF-8 text ({bytes(name)!r}: "
                f"{error.reason}); save class_names as a str array, "
                f"np.array(names, dtype=str), or as UTF-8 encoded bytes."
            ) from None
    return tuple(decoded)


def _labels(arrays, path):
    """The archive's label arrays as 1-D integer arrays of non-negative ids.

    They keep their dtype: an unsigned label too large for int64 would wrap to
    a negative one if converted before its range is checked.
    """
    labels = {}
    for key in LABEL_KEYS:
        if key not in arrays:
            continue
        values = arrays[key]
        if not np.issubdtype(values.dtype, np.integer):
            raise DatasetError(
                f"npz:{path}: {key} must hold integer class ids, got dtype "
                f"{values.dtype}; convert with .astype(np.int64)."
            )
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise DatasetError(
                f"npz:{path}: {key} must have shape (N,) or (N, 1), got "
                f"{values.shape}; store one class id per image."
            )
        if values.size and values.min() < 0:
            i = int(np.argmin(values))
            raise DatasetError(
                f"npz:{path}: {key}[{i}] = {values[i]} is a negative label; class "
                f"ids run from 0 to K-1, so relabel the classes to 0..K-1."
            )
        labels[key] = values
    return labels


def _largest_label(labels):
    """`(label, "key[i]")` of the largest label over all arrays, or None."""
    largest = None
    for key, values in labels.items():
        if values.size:
            i = int(np.argmax(values))
            if largest is None or int(values[i]) > largest[0]:
                largest = (int(values[i]), f"{key}[{i}]")
    return largest


def _missing_classes(present, num_classes, shown=5):
    """`(first few ids, count)` of the classes in `[0, num_classes)` that are
    not in `present`, a sorted array of distinct ids in that range.

    Walks `present` rather than the whole range, so a huge K costs nothing.
    """
    first, candidate = [], 0
    for label in present.tolist() + [num_classes]:
        while candidate < label and len(first) < shown:
            first.append(candidate)
            candidate += 1
        candidate = label + 1
        if len(first) == shown:
            break
    return first, num_classes - len(present)


def _class_list(ids, count, class_names=None):
    """Names classes for a message: 'class 2 has', 'classes 3, 4, ... (9 in all)
    have'."""
    if class_names is not None:
        ids = [f"{i} ({class_names[i]!r})" for i in ids]
    text = ", ".join(str(i) for i in ids)
    if count > len(ids):
        text += f", ... ({count} in all)"
    return f"class {text} has" if count == 1 else f"classes {text} have"


def _num_classes(labels, class_names, path):
    """K: the number of class names, else the largest label + 1.

    Every class in [0, K) needs at least one training image (a `y_train`
    label), so K is at most the number of training images. Without
    `class_names` a class with none is refused: it usually means a stray or
    mistyped label, and a single label of 1,000,000 would otherwise build a
    1,000,001-class model. Classes declared by `class_names` may have none: a
    warning names them, since the model cannot learn them.
    """
    num_train = len(labels["y_train"])
    present = np.unique(labels["y_train"])
    largest = _largest_label(labels)
    if class_names is not None:
        num_classes = len(class_names)
        for key, values in labels.items():
            if values.size and int(values.max()) >= num_classes:
                i = int(np.argmax(values))
                raise DatasetError(
                    f"npz:{path}: {key} has label {values[i]} outside "
                    f"[0, {num_classes}) ({key}[{i}]), but class_names has "
                    f"{num_classes} names; add the missing names to class_names, "
                    f"or relabel the classes to 0..{num_classes - 1}."
                )
        if num_train and num_classes > num_train:
            raise DatasetError(
                f"npz:{path}: class_names declares {num_classes} classes but there "
                f"are {num_train} training images, so at least "
                f"{num_classes - num_train} classes would have none and could not "
                f"be learnt; K may not exceed the number of training images. "
                f"Remove the unused names."
            )
        if num_train:
            first, count = _missing_classes(present, num_classes)
            if count:
                logging.warning(
                    "npz:%s: %s no training image in y_train; the model cannot "
                    "learn to predict %s.",
                    path,
                    _class_list(first, count, class_names),
                    "it" if count == 1 else "them",
                )
        return num_classes
    num_classes = 1 + (largest[0] if largest else -1)
    if num_classes < 2:
        raise DatasetError(
            f"npz:{path}: the labels use {max(num_classes, 0)} class(es); a "
            f"dataset needs at least 2. Add a class_names array to declare "
            f"classes that have no samples."
        )
    if num_train:
        first, count = _missing_classes(present, num_classes)
        if count:
            raise DatasetError(
                f"npz:{path}: without class_names, K is the largest label + 1 = "
                f"{num_classes} ({largest[1]} = {largest[0]}), but "
                f"{_class_list(first, count)} no training image in y_train. "
                f"Relabel the classes to 0..K-1, each with a training image; or, "
                f"if classes without training images are meant, add a "
                f"class_names array to the npz to declare all K (at most one "
                f"class per training image)."
            )
    return num_classes


@register("npz", prefix=True)
def load_npz(arg, data_dir, **options):
    """Loads `npz:PATH`; the dataset is named after the file's stem.

    Args:
        arg: str. The path of the `.npz` file; `~` is expanded.
        data_dir: unused.

    Returns:
        A `Dataset` with mean and std computed from `x_train`.

    Raises:
        DatasetError: naming the file and the key at fault.
    """
    path = os.path.expanduser(arg)
    arrays = _read_arrays(path)
    class_names = _class_names(arrays, path)
    labels = _labels(arrays, path)
    num_classes = _num_classes(labels, class_names, path)
    if class_names is None:
        class_names = tuple(str(label) for label in range(num_classes))
    try:
        return Dataset(
            name=pathlib.Path(path).stem,
            x_train=arrays["x_train"],
            y_train=labels["y_train"],
            x_test=arrays["x_test"],
            y_test=labels["y_test"],
            num_classes=num_classes,
            class_names=class_names,
            y_train_clean=labels.get("y_train_clean"),
        )
    except DatasetError as error:
        # Dataset's field names are the archive's keys, so its message names
        # the key at fault; add the file.
        raise DatasetError(f"npz:{path}: {error}") from error
