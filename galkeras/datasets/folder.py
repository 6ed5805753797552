"""`folder:PATH`: a user's own noisily labelled images on disk.

Two layouts, like `keras.utils.image_dataset_from_directory`:

- `PATH/train/<class>/*.jpg` and `PATH/test/<class>/*.jpg`;
- `PATH/<class>/*.jpg`, split with `validation_split` (a stratified, seeded share
  becomes the test set).

Optionally `labels_csv` (a file of `path,label` lines, paths relative to PATH)
gives the training labels when they do not follow the folders; a label is a class
name or an integer id. Images are decoded once into memory (RGB), resized to
`image_size` (default: the first image's size).
"""

import csv
import os

import numpy as np

from galkeras.datasets.base import Dataset, DatasetError, register, stratified_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _class_dirs(root):
    if not os.path.isdir(root):
        raise DatasetError(f"folder: {root} is not a directory.")
    classes = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
    )
    if not classes:
        raise DatasetError(
            f"folder: {root} has no class subfolders; expected {root}/<class>/*.jpg."
        )
    return classes


def _images_of(directory):
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )


def _scan(root, classes):
    """`(paths, labels)` of every image under `root/<class>/`, classes in order."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _images_of(os.path.join(root, name))
        if not files:
            raise DatasetError(
                f"folder: class {name!r} has no images in {os.path.join(root, name)} "
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
                image = tf.io.decode_image(
                    f.read(), channels=3, expand_animations=False
                )
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
        if tuple(image.shape[:2]) != tuple(image_size):
            image = tf.cast(
                tf.round(tf.image.resize(image, image_size, antialias=True)), tf.uint8
            )
        images.append(image.numpy())
        kept.append(True)
    if not images:
        raise DatasetError("folder: no image could be decoded.")
    return np.stack(images), np.asarray(kept), image_size


def _read_labels_csv(csv_path, root, classes):
    """`{absolute path: label}` from a `path,label` CSV; refuses bad lines."""
    real_root = os.path.realpath(root)
    labels = {}
    with open(csv_path, newline="") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            if not row or (line_number == 1 and row[:2] == ["path", "label"]):
                continue
            where = f"{csv_path}, line {line_number}"
            if len(row) != 2:
                raise DatasetError(
                    f"{where}: expected 2 columns (path,label), got {row}."
                )
            rel, label = row[0].strip(), row[1].strip()
            path = os.path.realpath(os.path.join(root, rel))
            if os.path.isabs(rel) or os.path.commonpath([real_root, path]) != real_root:
                raise DatasetError(
                    f"{where}: path {rel!r} leaves the dataset root {root}; paths must "
                    "be relative and stay inside it."
                )
            if label in classes:
                label_id = classes.index(label)
            else:
                try:
                    label_id = int(label)
                except ValueError:
                    raise DatasetError(
                        f"{where}: label {label!r} is neither a class name {classes} "
                        "nor an integer."
                    ) from None
            if not 0 <= label_id < len(classes):
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
        classes = _class_dirs(os.path.join(root, "train"))
        test_classes = _class_dirs(os.path.join(root, "test"))
        if test_classes != classes:
            raise DatasetError(
                f"folder: {root}/train has classes {classes} but {root}/test has "
                f"{test_classes}; both need the same class subfolders."
            )
        train_paths, train_labels = _scan(os.path.join(root, "train"), classes)
        test_paths, test_labels = _scan(os.path.join(root, "test"), classes)
    else:
        if not 0.0 < validation_split < 1.0:
            raise DatasetError(
                f"folder: {root} has no train/ and test/ folders, so "
                f"--validation_split must be in (0, 1); got {validation_split}."
            )
        classes = _class_dirs(root)
        paths, labels = _scan(root, classes)
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
    )
