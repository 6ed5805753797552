"""The `Dataset` container and the registry of dataset sources.

A source registers a loader under a name. A plain source is loaded by its name
(`digits`); a prefix source takes an argument after a colon (`npz:PATH`). The
training script only ever calls `load_dataset(spec)`, and its flag validators
call `check_dataset_spec(spec)`, which loads nothing.

Example:

```python
@register("tiny")
def load_tiny(arg, data_dir, **options):
    return Dataset(name="tiny", x_train=..., y_train=..., ...)

dataset = load_dataset("tiny")
```
"""

import dataclasses
import difflib

import numpy as np


class DatasetError(ValueError):
    """A dataset spec or a dataset's contents are invalid.

    The message names what is at fault (the file, the key, the flag) and how to
    fix it.
    """


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image classification dataset: labels in memory, images in memory or
    on disk.

    Images are uint8 pixels in `[0, 255]`, shaped `[N, H, W, C]`; `[N, H, W]` is
    accepted and gets a channel axis. Labels are int64 in `[0, num_classes)`;
    other integer dtypes and `[N, 1]` label arrays are converted.

    Args:
        name: str. The dataset's name, used in logs and run directories.
        x_train: uint8 array `[N, H, W, C]`, the training images, or
            `galkeras.ImageFiles` for a source too large to hold in memory
            (Clothing1M); its images are decoded on demand in `tf.data`.
        y_train: int64 array `[N]`, the annotated training labels as the source
            gives them (real noise included), before any synthetic noise.
        x_test: uint8 array `[M, H, W, C]` or `ImageFiles`, the clean test
            images.
        y_test: int64 array `[M]`, the test labels.
        num_classes: int. The number of classes `K`, at least 2.
        class_names: tuple of `K` strings.
        y_train_clean: int64 array `[N]` or None. The clean training labels when
            known, for the pseudo-labels' precision (spec, "Evaluation").
        mean: tuple of `C` floats or None. Per-channel pixel mean in the 0–255
            scale, for normalisation inside the model. None computes it from
            `x_train`.
        std: tuple of `C` floats or None. Per-channel pixel standard deviation,
            likewise. A constant channel gets 1.0 so normalising stays finite.
        noisy_label_sets: dict of name -> int64 array `[N]`, or None. Real
            human-annotated label sets of the training images (CIFAR-10N's
            `aggre`, `worse`, ...), selected by `--noise_type`.
        augmentation: str. The source's default training augmentation, one of
            `galkeras.augment.AUGMENTATIONS`; `--augment=auto` uses it.
        skipped_images: int. Corrupt files a source skipped on request.
        x_val: uint8 array or `ImageFiles`, or None. A clean validation split
            for model selection (Clothing1M's protocol: report the test
            accuracy at the epoch of best validation accuracy).
        y_val: int64 array `[V]` or None, its labels.
        train_paths: tuple of `N` str or None. For sources of image files
            (`folder:`, Clothing1M), each training image's path relative to the
            dataset's root, as `label_issues.csv` and a `--labels_csv` file name
            them.

    Raises:
        DatasetError: if shapes, dtypes, lengths or labels are inconsistent.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    y_train_clean: np.ndarray | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    noisy_label_sets: dict | None = None
    augmentation: str = "none"
    skipped_images: int = 0
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    train_paths: tuple[str, ...] | None = None

    def __post_init__(self):
        def fail(message):
            raise DatasetError(f"Dataset {self.name!r}: {message}")

        # The dataclass is frozen: the normalised fields are set through object.
        def set_field(field, value):
            object.__setattr__(self, field, value)

        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, (int, np.integer))
            or self.num_classes < 2
        ):
            fail(f"num_classes must be an integer >= 2, got {self.num_classes!r}.")
        set_field("num_classes", int(self.num_classes))
        class_names = tuple(str(name) for name in self.class_names)
        if len(class_names) != self.num_classes:
            fail(
                f"class_names has {len(class_names)} names but num_classes is "
                f"{self.num_classes}; give one name per class."
            )
        duplicates = _duplicates(class_names)
        if duplicates:
            # Predictions are exported and reported by name, so two classes
            # with one name could not be told apart.
            fail(
                "class_names must be unique, but "
                + "; ".join(
                    f"duplicate class name {name!r} names classes "
                    + ", ".join(str(i) for i in ids)
                    for name, ids in duplicates.items()
                )
                + ". Rename or merge those classes."
            )
        set_field("class_names", class_names)

        if (self.x_val is None) != (self.y_val is None):
            fail("x_val and y_val must be given together.")
        image_keys = ("x_train", "x_test", "x_val")
        for key in image_keys:
            if getattr(self, key) is not None:
                set_field(key, _as_images(getattr(self, key), key, fail))
        for key in image_keys[1:]:
            images = getattr(self, key)
            if images is not None and self.x_train.shape[1:] != images.shape[1:]:
                fail(
                    f"x_train images are {self.x_train.shape[1:]} (H, W, C) but "
                    f"{key} images are {images.shape[1:]}; every split needs one "
                    f"image shape."
                )

        label_keys = [("y_train", "x_train"), ("y_test", "x_test")]
        if self.y_val is not None:
            label_keys.append(("y_val", "x_val"))
        if self.y_train_clean is not None:
            label_keys.append(("y_train_clean", "x_train"))
        for key, images_key in label_keys:
            labels = _as_labels(getattr(self, key), key, self.num_classes, fail)
            num_images = len(getattr(self, images_key))
            if len(labels) != num_images:
                fail(
                    f"{key} has {len(labels)} labels but {images_key} has "
                    f"{num_images} images; they must have the same length."
                )
            set_field(key, labels)
        if self.noisy_label_sets is not None:
            label_sets = {}
            for set_name, labels in self.noisy_label_sets.items():
                key = f"noisy_label_sets[{set_name!r}]"
                labels = _as_labels(labels, key, self.num_classes, fail)
                if len(labels) != len(self.x_train):
                    fail(
                        f"{key} has {len(labels)} labels for "
                        f"{len(self.x_train)} images."
                    )
                label_sets[set_name] = labels
            set_field("noisy_label_sets", label_sets)
        if self.train_paths is not None:
            set_field("train_paths", tuple(str(p) for p in self.train_paths))
            if len(self.train_paths) != len(self.x_train):
                fail(
                    f"train_paths has {len(self.train_paths)} paths for "
                    f"{len(self.x_train)} images."
                )

        num_channels = self.image_shape[-1]
        if (self.mean is None or self.std is None) and not isinstance(
            self.x_train, np.ndarray
        ):
            fail(
                "images decoded from disk (ImageFiles) need the source to give "
                "mean and std; computing them would decode every image."
            )
        if self.mean is None or self.std is None:
            mean, std = channel_mean_std(self.x_train)
            set_field("mean", self.mean if self.mean is not None else mean)
            set_field("std", self.std if self.std is not None else std)
        for key in ("mean", "std"):
            values = tuple(float(v) for v in np.ravel(getattr(self, key)))
            if len(values) != num_channels:
                fail(
                    f"{key} has {len(values)} values but the images have "
                    f"{num_channels} channels; give one per channel."
                )
            set_field(key, values)
        if min(self.std) <= 0:
            fail(f"std must be positive per channel, got {self.std}.")

    @property
    def image_shape(self):
        """The shape of one image, `(H, W, C)`."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self):
        """The number of training samples."""
        return len(self.x_train)


def _duplicates(names):
    """`{name: [positions]}` of each name that occurs more than once."""
    positions = {}
    for i, name in enumerate(names):
        positions.setdefault(name, []).append(i)
    return {name: ids for name, ids in positions.items() if len(ids) > 1}


def _as_images(images, key, fail):
    from galkeras.image_files import ImageFiles

    if isinstance(images, ImageFiles):
        return images
    images = np.asarray(images)
    if images.dtype != np.uint8:
        fail(
            f"{key} must hold uint8 pixels in 0..255, got dtype {images.dtype}; "
            f"convert with np.clip(x, 0, 255).astype(np.uint8)."
        )
    if images.ndim not in (3, 4):
        fail(f"{key} must have shape (N, H, W) or (N, H, W, C), got {images.shape}.")
    if 0 in images.shape[1:]:
        fail(
            f"{key} has shape {images.shape}: each image's height, width and "
            f"channels must be at least 1; store the images as (N, H, W) or "
            f"(N, H, W, C) uint8 pixels."
        )
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if len(images) == 0:
        fail(f"{key} holds no images.")
    return images


def _as_labels(labels, key, num_classes, fail):
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        fail(f"{key} must have shape (N,) or (N, 1), got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        fail(f"{key} must hold integer class ids, got dtype {labels.dtype}.")
    if labels.size:
        low, high = labels.min(), labels.max()
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            fail(
                f"{key} has label {bad} outside [0, {num_classes}) "
                f"(num_classes={num_classes})."
            )
    return labels.astype(np.int64)


def channel_mean_std(images, chunk_size=4096):
    """Per-channel mean and standard deviation of uint8 images, 0–255 scale.

    Sums in float64 over chunks of images, so a large dataset is never copied
    to float as a whole.

    Args:
        images: array `[N, H, W, C]`.
        chunk_size: int. Images per chunk.

    Returns:
        `(mean, std)`, two tuples of `C` Python floats. A constant channel gets
        std 1.0, so that normalising by it stays finite.
    """
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk_size):
        chunk = images[start : start + chunk_size].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.size // images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(mean.tolist()), tuple(std.tolist())


# name -> (loader, takes an argument after "name:").
_LOADERS = {}
# name -> StandIn, for sources whose data may be absent (downloads, manual dirs).
_STAND_INS = {}


@dataclasses.dataclass(frozen=True)
class StandIn:
    """The shape of a source's data, for dry runs that must not need the data.

    Args:
        image_shape: `(H, W, C)` of its images.
        num_classes: K.
        augmentation: its default augmentation.
        label_sets: names of its real noisy label sets (CIFAR-N).
        validation: whether it has a validation split (Clothing1M).
    """

    image_shape: tuple
    num_classes: int
    augmentation: str = "none"
    label_sets: tuple = ()
    validation: bool = False


def register(name, *, prefix=False, stand_in=None):
    """Registers a dataset loader under `name` (a decorator).

    The loader is called as `loader(arg, data_dir, **options)` and returns a
    `Dataset`; it takes every option as a keyword and ignores those it does not use.
    A plain loader is selected by the spec `name` and gets `arg=None`; a prefix
    loader is selected by `name:ARG` and gets the text after the colon.

    Args:
        name: str. The source's name; no colon.
        prefix: bool. Whether the source takes an argument (`npz:PATH`).
        stand_in: `StandIn` or None. The data's shape, so that a dry run can
            build everything without the data (`stand_in_dataset`).

    Returns:
        The decorator, which returns the loader unchanged.
    """
    if not name or ":" in name:
        raise ValueError(f"A dataset name must be non-empty with no ':', got {name!r}.")

    def decorator(loader):
        if name in _LOADERS and _LOADERS[name][0] is not loader:
            registered = _LOADERS[name][0]
            raise ValueError(
                f"Dataset {name!r} is already registered by "
                f"{registered.__module__}.{registered.__qualname__}."
            )
        _LOADERS[name] = (loader, prefix)
        if stand_in is not None:
            _STAND_INS[name] = stand_in
        return loader

    return decorator


def dataset_names():
    """The registered dataset specs, sorted; a prefix source shows as `name:PATH`."""
    return sorted(
        f"{name}:PATH" if prefix else name for name, (_, prefix) in _LOADERS.items()
    )


def _parse_spec(spec):
    """Returns `(loader, arg)` for a spec, or raises DatasetError."""
    if not isinstance(spec, str):
        raise DatasetError(f"A dataset spec must be a string, got {spec!r}.")
    name, colon, arg = spec.partition(":")
    known = ", ".join(dataset_names())
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, list(_LOADERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"Unknown dataset {spec!r}; known: {known}.{hint}")
    loader, prefix = _LOADERS[name]
    if prefix and not arg:
        raise DatasetError(
            f"Dataset {name!r} needs an argument: write it as '{name}:PATH'."
        )
    if not prefix and colon:
        raise DatasetError(
            f"Dataset {name!r} takes no argument after ':', got {spec!r}; "
            f"write it as {name!r}."
        )
    return loader, (arg if prefix else None)


def check_dataset_spec(spec):
    """Checks that a spec names a registered source, without loading anything.

    Meant for command-line flag validators: it is cheap and does not touch the
    file system.

    Args:
        spec: str. A name (`digits`) or `name:ARG` for a prefix source.

    Raises:
        DatasetError: for an unknown name (the message lists the known ones) or
            a missing or unexpected argument.
    """
    _parse_spec(spec)


def load_dataset(spec, data_dir=None, **options):
    """Loads the dataset named by `spec`.

    Args:
        spec: str. A name from `dataset_names()`, e.g. `digits`, or
            `name:ARG` for a prefix source, e.g. `npz:/data/mine.npz`.
        data_dir: str or None. Where sources that download or cache data keep
            it; sources that need none ignore it.
        **options: source options (`image_size`, `validation_split`, ...);
            every loader takes them as keywords and ignores those it has no use
            for.

    Returns:
        A `Dataset`.

    Raises:
        DatasetError: for an unknown spec or invalid data.
    """
    loader, arg = _parse_spec(spec)
    dataset = loader(arg, data_dir, **options)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"The loader for {spec!r} returned {type(dataset).__name__}, not a Dataset."
        )
    return dataset


def stand_in_dataset(spec, num_examples, image_size=None, seed=0, **options):
    """Random data shaped like `spec`'s, for a dry run (`--dry_run`).

    Sources that need a download or a manual directory (CIFAR, Animal-10N,
    Clothing1M) registered a `StandIn`; their stand-in has `num_examples`
    random training, test (and validation) images of the real shape and class
    count, and random real-noise label sets. Sources whose data are local
    (`digits`, `npz:`, `folder:`) are loaded for real.

    Args:
        spec: str, a dataset spec.
        num_examples: int, images per split of a stand-in.
        image_size: `(H, W)` or None, overriding the stand-in's image size.
        seed: int, seed of the random pixels and labels.
        **options: passed to `load_dataset` for local sources.

    Returns:
        A `Dataset`.
    """
    name = spec.partition(":")[0]
    _parse_spec(spec)
    if name not in _STAND_INS:
        return load_dataset(spec, **options)
    info = _STAND_INS[name]
    shape = tuple(info.image_shape)
    if image_size:
        shape = (*image_size, shape[2])
    rng = np.random.default_rng(seed)

    def images():
        return rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8)

    def labels():
        return np.arange(num_examples) % info.num_classes

    return Dataset(
        name=name,
        x_train=images(),
        y_train=labels(),
        x_test=images(),
        y_test=labels(),
        num_classes=info.num_classes,
        class_names=tuple(f"class_{k}" for k in range(info.num_classes)),
        y_train_clean=labels(),
        noisy_label_sets={k: rng.permutation(labels()) for k in info.label_sets}
        or None,
        augmentation=info.augmentation,
        x_val=images() if info.validation else None,
        y_val=labels() if info.validation else None,
    )


def tfds_manual_dir(data_dir):
    """TFDS' manual-download directory: `<data_dir>/downloads/manual`, where
    `data_dir` defaults to `$TFDS_DATA_DIR` or `~/tensorflow_datasets` as in TFDS."""
    import os

    root = data_dir or os.environ.get(
        "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
    )
    return os.path.join(root, "downloads", "manual")


def prepare_manual_builder(builder, name, instructions, data_dir):
    """Prepares a manual-download TFDS builder once; later calls do nothing.

    Args:
        builder: a `tfds.core.DatasetBuilder` whose data come from the manual dir.
        name: str, the dataset's name in messages.
        instructions: str, where to get the data and how to lay it out.
        data_dir: the TFDS data directory, or None for TFDS' default.

    Raises:
        DatasetError: naming the manual directory and the instructions when it is
            missing, and the cause when preparing fails (a corrupt file, ...).
    """
    import os

    import tensorflow_datasets as tfds

    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        return
    manual = tfds_manual_dir(data_dir)
    if not os.path.isdir(manual):
        raise DatasetError(f"{name}: no manual directory {manual}.\n{instructions}")
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual)
        )
    except DatasetError:
        raise
    except Exception as error:  # an unreadable file, a full disk, ...
        raise DatasetError(
            f"{name}: preparing from {manual} failed: {type(error).__name__}: {error}"
        ) from error


def tfds_split_arrays(dataset, chunk=4096):
    """A TFDS split (a `tf.data.Dataset` of feature dicts) as `{feature: array}`.

    Reads in batches of `chunk` rather than with `batch_size=-1`, which needs the
    split's size up front and breaks under `tfds.testing.mock_data`.
    """
    import tensorflow_datasets as tfds

    parts = {}
    for batch in tfds.as_numpy(dataset.batch(chunk)):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def stratified_split(labels, test_fraction, seed, min_test_per_class=0):
    """Splits sample ids per class: `round(test_fraction * n_j)` of class j test.

    Written in NumPy rather than with scikit-learn's `train_test_split`, so the
    split depends only on NumPy's `default_rng` stream.

    Args:
        labels: 1-D integer array.
        test_fraction: float in `[0, 1]`.
        seed: int, or a sequence of ints. Seed of `np.random.default_rng`; the
            classes are permuted in increasing class order from one generator.
        min_test_per_class: int. At least this many of each class go to test.

    Returns:
        `(train_ids, test_ids)`, sorted int64 arrays that partition the ids.
    """
    rng = np.random.default_rng(seed)
    test_ids = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = max(min_test_per_class, int(round(test_fraction * len(members))))
        test_ids.append(members[:count])
    test_ids = np.sort(np.concatenate(test_ids)).astype(np.int64)
    train_ids = np.setdiff1d(np.arange(len(labels)), test_ids).astype(np.int64)
    return train_ids, test_ids
