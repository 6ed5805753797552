"""`npz:PATH`: a dataset from one NumPy `.npz` archive.

The archive holds plain arrays, written for example with

```python
np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
```

- `x_train`, `x_test`: uint8 images, `(N, H, W)` or `(N, H, W, C)`.
- `y_train`, `y_test`: integer labels, `(N,)` or `(N, 1)`.
- `y_train_clean` (optional): the clean training labels, when `y_train` is noisy.
- `class_names` (optional): a string array, one name per class. Without it the
  number of classes is the largest label + 1 over all label arrays.

Pickled (object) arrays are refused: the file is loaded with
`allow_pickle=False`, so a downloaded archive cannot run code.
"""

import os
import pathlib
import zipfile

import numpy as np

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
    if names.dtype.kind == "S":
        return tuple(name.decode("utf-8") for name in names)
    return tuple(str(name) for name in names)


def _num_classes(arrays, class_names, path):
    """K: the number of class names, else the largest label + 1."""
    for key in LABEL_KEYS:
        if key in arrays and not np.issubdtype(arrays[key].dtype, np.integer):
            raise DatasetError(
                f"npz:{path}: {key} must hold integer class ids, got dtype "
                f"{arrays[key].dtype}; convert with .astype(np.int64)."
            )
    if class_names is not None:
        return len(class_names)
    num_classes = 1 + max(
        int(arrays[key].max(initial=-1)) for key in LABEL_KEYS if key in arrays
    )
    if num_classes < 2:
        raise DatasetError(
            f"npz:{path}: the labels use {max(num_classes, 0)} class(es); a "
            f"dataset needs at least 2. Add a class_names array to declare "
            f"classes that have no samples."
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
    num_classes = _num_classes(arrays, class_names, path)
    if class_names is None:
        class_names = tuple(str(label) for label in range(num_classes))
    try:
        return Dataset(
            name=pathlib.Path(path).stem,
            x_train=arrays["x_train"],
            y_train=arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            num_classes=num_classes,
            class_names=class_names,
            y_train_clean=arrays.get("y_train_clean"),
        )
    except DatasetError as error:
        # Dataset's field names are the archive's keys, so its message names
        # the key at fault; add the file.
        raise DatasetError(f"npz:{path}: {error}") from error
