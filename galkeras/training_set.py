"""`TrainingSet`: the noisily labelled data GAL trains on, and how batches are drawn."""

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class TrainingSet:
    """Training images with their annotated (possibly noisy) labels.

    GAL needs random access to the whole training set: CDAS matches one batch's
    class counts from the rest of the set (§3.1), and θC's pseudo-labels are
    refreshed over every sample at the start of each epoch (§3.3). So `GAL.fit`
    takes this object (or plain arrays) rather than a finished `tf.data.Dataset`,
    and builds the paired-batch pipeline from it.

    Args:
        images: uint8 `[N, H, W, C]` (or `[N, H, W]`), raw pixels, or
            `galkeras.ImageFiles` for images decoded from disk on demand.
        labels: int `[N]`, the annotated labels that training sees.
        batch_size: global batch size of each twin.
        sampling: one of `galkeras.sampling.SAMPLING_MODES` (default `"cdas"`).
        seed: seed of the batch plan (shuffles, matched batches).
        augment: optional augmentation applied inside `tf.data` to a float32
            image batch in the 0-255 scale: `galkeras.augment.make_augment(...)`
            (reproducible, seeded per step), or any function of the batch.
        clean_labels: optional int `[N]` true labels, for pseudo-label precision.
        num_classes: K; inferred as `max(labels) + 1` when omitted.
    """

    images: np.ndarray
    labels: np.ndarray
    batch_size: int = 32
    sampling: str = "cdas"
    seed: int = 0
    augment: Optional[Callable] = None
    clean_labels: Optional[np.ndarray] = None
    num_classes: Optional[int] = None

    def __post_init__(self):
        from galkeras.image_files import ImageFiles

        images = self.images
        if not isinstance(images, ImageFiles):
            images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                "TrainingSet.images must be uint8 of shape [N, H, W] or [N, H, W, C]; "
                f"got {images.dtype} {images.shape}."
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"TrainingSet.labels must have shape [{images.shape[0]}] to match the "
                f"images; got {labels.shape}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"TrainingSet.labels must be integers; got {labels.dtype}."
            )
        if self.num_classes is None:
            self.num_classes = int(labels.max()) + 1
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"TrainingSet.labels must lie in [0, {self.num_classes}); found "
                f"{labels.min()}..{labels.max()}."
            )
        if not 1 <= self.batch_size <= images.shape[0]:
            raise ValueError(
                f"batch_size must be in [1, {images.shape[0]}] (the number of "
                f"training images); got {self.batch_size}."
            )
        if self.clean_labels is not None:
            self.clean_labels = np.asarray(self.clean_labels, np.int64)
            if self.clean_labels.shape != labels.shape:
                raise ValueError("TrainingSet.clean_labels must match labels' shape.")
        self.images = images
        self.labels = labels.astype(np.int64)

    @property
    def num_examples(self):
        return self.images.shape[0]

    @property
    def steps_per_epoch(self):
        """⌈N / batch_size⌉: a GAL epoch has as many steps as a CE epoch (spec)."""
        return -(-self.num_examples // self.batch_size)
