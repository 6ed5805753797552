"""`folder:PATH`: a user's own noisily labelled images on disk.

Two layouts, like `keras.utils.image_dataset_from_directory`:

- `PATH/train/<class>/*.jpg` and `PATH/test/<class>/*.jpg`;
- `PATH/<class>/*.jpg`, split with `validation_split` (a stratified, seeded share
  becomes the test set).

Optionally `labels_csv` (a UTF-8 file of `path,label` lines, paths relative to
PATH; a byte order mark, as Excel's "CSV UTF-8" writes, is skipped) gives the
training labels when they do not follow the folders; a label is a class name or
an integer id, and an empty label leaves that image out of training (a cleaned
label file of `galkeras.label_issues` drops issues so). Training images the file
does not list keep their folder's label. Images are decoded once into memory
(RGB), resized to `image_size` (default: the first image's size).

Symbolic links are followed only while they stay inside PATH: a folder or image
whose real path leaves PATH is refused, as a `labels_csv` path that leaves it
is, so the dataset is what lies under PATH.
"""

import csv
import io
import os

import numpy as np

from galkeras.datasets.base import Dataset, DatasetError, register, stratified_split
from galkeras.image_files import IMAGE_EXTENSIONS, decode_image

# The label of a `labels_csv` row with an empty label: not a training image.
DROPPED = -1


def _check_inside(path, root):
    """Refuses `path` when its real path, links followed, leaves `root`."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        how = "is a link to" if os.path.islink(path) else "resolves to"
        raise DatasetError(
            f"folder: {path} {how} {real}, outside the dataset root {root}. Links "
            "are followed only inside the root, as paths in --labels_csv are: copy "
            "the target into the root, or give a root that holds it."
        )


def _class_dirs(directory, root):
    if not os.path.isdir(directory):
        raise DatasetError(f"folder: {directory} is not a directory.")
    classes = sorted(
        d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d))
    )
    if not classes:
        raise DatasetError(
            f"folder: {directory} has no class subfolders; expected "
            f"{directory}/<class>/*.jpg."
        )
    for name in classes:
        _check_inside(os.path.join(directory, name), root)
    return classes


def _images_of(directory, root):
    paths = sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    for path in paths:
        _check_inside(path, root)
    return paths


def _scan(directory, classes, root):
    """`(paths, labels)` of every image under `directory/<class>/`, classes in
    order."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _images_of(os.path.join(directory, name), root)
        if not files:
            raise DatasetError(
                f"folder: class {name!r} has no images in "
                f"{os.path.join(directory, name)} "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})."
            )
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, np.int64)


def _decode(paths, image_size, skip_corrupt):
    """Decodes `paths` to uint8 RGB `[N, H, W, 3]`; returns it and the kept mask."""
    import tensorflow as tf

    images, kept = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                image = decode_image(f.read(), image_size)
        except (tf.errors.InvalidArgumentError, OSError) as error:
            if not skip_corrupt:
                raise DatasetError(
                    f"folder: cannot decode image {path}: {error}. Remove or fix the "
                    "file, or pass --skip_corrupt_images to skip (and count) it."
                ) from error
            kept.append(False)
            continue
        if image_size is None:
            image_size = tuple(int(d) for d in image.shape[:2])
        images.append(image.numpy())
        kept.append(True)
    if not images:
        raise DatasetError("folder: no image could be decoded.")
    return np.stack(images), np.asarray(kept), image_size


def _read_labels_csv(csv_path, root, classes):
    """`{absolute path: label}` from a `path,label` CSV; refuses bad lines."""
    if not os.path.isfile(csv_path):
        raise DatasetError(
            f"labels_csv {csv_path} does not exist or is not a file; give the path "
            "of a CSV of path,label lines."
        )
    with open(csv_path, "rb") as f:
        data = f.read()
    try:
        # utf-8-sig skips the byte order mark of Excel's "CSV UTF-8".
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_number = data[: error.start].count(b"\n") + 1
        raise DatasetError(
            f"{csv_path}, line {line_number}: not UTF-8 text ({error.reason}); "
            "save the file as UTF-8 (in Excel: 'CSV UTF-8')."
        ) from None
    rows = csv.reader(io.StringIO(text, newline=""))
    return _parse_labels_csv(rows, csv_path, root, classes)


def _parse_labels_csv(rows, csv_path, root, classes):
    """`{absolute path: label}` from the CSV's rows (lists of cells)."""
    real_root = os.path.realpath(root)
    labels = {}
    for line_number, row in enumerate(rows, start=1):
        if not row or (line_number == 1 and row[:2] == ["path", "label"]):
            continue
        where = f"{csv_path}, line {line_number}"
        if len(row) != 2:
            hint = ""
            if len(row) == 1 and (";" in row[0] or "\t" in row[0]):
                hint = " Separate the path and the label with a comma."
            raise DatasetError(
                f"{where}: expected 2 columns (path,label), got {row}.{hint}"
            )
        rel, label = row[0].strip(), row[1].strip()
        path = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or os.path.commonpath([real_root, path]) != real_root:
            raise DatasetError(
                f"{where}: path {rel!r} leaves the dataset root {root}; paths must "
                "be relative and stay inside it."
            )
        if label == "":
            label_id = DROPPED
        elif label in classes:
            label_id = classes.index(label)
        else:
            try:
                label_id = int(label)
            except ValueError:
                raise DatasetError(
                    f"{where}: label {label!r} is neither a class name {classes} "
                    "nor an integer."
                ) from None
        if label_id != DROPPED and not 0 <= label_id < len(classes):
            raise DatasetError(
                f"{where}: label {label_id} is outside [0, {len(classes)})."
            )
        if path in labels:
            raise DatasetError(f"{where}: {rel!r} is listed twice.")
        labels[path] = label_id
    return labels


@register("folder", prefix=True)
def load_folder(
    arg,
    data_dir,
    image_size=None,
    validation_split=0.2,
    labels_csv=None,
    skip_corrupt_images=False,
    seed=0,
    **unused,
):
    """Loads `folder:PATH` (see the module docstring for the layouts).

    Args:
        arg: PATH, the dataset root.
        data_dir: unused.
        image_size: `(H, W)` or None (the first image's size).
        validation_split: test share when there is no `train/`+`test/` layout.
        labels_csv: optional CSV of `path,label` lines overriding the training
            labels; relative paths resolve inside PATH.
        skip_corrupt_images: skip undecodable files instead of failing; their
            number is recorded in the dataset's `skipped_images`.
        seed: seed of the validation split.
    """
    root = arg
    split_layout = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(
        os.path.join(root, "test")
    )
    if split_layout:
        for split in ("train", "test"):
            _check_inside(os.path.join(root, split), root)
        classes = _class_dirs(os.path.join(root, "train"), root)
        test_classes = _class_dirs(os.path.join(root, "test"), root)
        if test_classes != classes:
            raise DatasetError(
                f"folder: {root}/train has classes {classes} but {root}/test has "
                f"{test_classes}; both need the same class subfolders."
            )
        train_paths, train_labels = _scan(os.path.join(root, "train"), classes, root)
        test_paths, test_labels = _scan(os.path.join(root, "test"), classes, root)
    else:
        if not 0.0 < validation_split < 1.0:
            raise DatasetError(
                f"folder: {root} has no train/ and test/ folders, so "
                f"--validation_split must be in (0, 1); got {validation_split}."
            )
        classes = _class_dirs(root, root)
        paths, labels = _scan(root, classes, root)
        _, test_ids = stratified_split(
            labels, validation_split, seed, min_test_per_class=1
        )
        test_mask = np.zeros(len(paths), bool)
        test_mask[test_ids] = True
        train_paths = [p for p, t in zip(paths, test_mask) if not t]
        test_paths = [p for p, t in zip(paths, test_mask) if t]
        train_labels, test_labels = labels[~test_mask], labels[test_mask]
    if labels_csv:
        csv_labels = _read_labels_csv(labels_csv, root, classes)
        unknown = set(csv_labels) - {os.path.realpath(p) for p in train_paths}
        if unknown:
            raise DatasetError(
                f"{labels_csv}: {len(unknown)} path(s) are not training images of "
                f"{root}, e.g. {sorted(unknown)[0]}."
            )
        train_labels = np.array(
            [
                csv_labels.get(os.path.realpath(p), lbl)
                for p, lbl in zip(train_paths, train_labels)
            ],
            np.int64,
        )
        listed = train_labels != DROPPED
        train_paths = [p for p, keep in zip(train_paths, listed) if keep]
        train_labels = train_labels[listed]
        left = set(train_labels.tolist())
        empty = [c for i, c in enumerate(classes) if i not in left]
        if empty:
            raise DatasetError(
                f"{labels_csv} leaves no training image in class(es) {empty}: "
                "give each class at least one (a row with an empty label drops "
                "that image)."
            )
    x_train, kept_train, size = _decode(train_paths, image_size, skip_corrupt_images)
    x_test, kept_test, _ = _decode(test_paths, size, skip_corrupt_images)
    skipped = int((~kept_train).sum() + (~kept_test).sum())
    return Dataset(
        name=os.path.basename(os.path.normpath(root)),
        x_train=x_train,
        y_train=train_labels[kept_train],
        x_test=x_test,
        y_test=test_labels[kept_test],
        num_classes=len(classes),
        class_names=tuple(classes),
        augmentation="crop_flip",
        skipped_images=skipped,
        train_paths=[
            os.path.relpath(p, root) for p, keep in zip(train_paths, kept_train) if keep
        ],
    )
