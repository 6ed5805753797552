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
        """⌈N / batch_size⌉: a GAL epoch has as many steps as a CE epoch, so
        epoch-based schedules mean the same thing for both."""
        return -(-self.num_examples // self.batch_size)


# Mixed into `--seed` so that the held-out draw is independent of the other
# stratified splits a source may make under the same seed (`folder:`'s test split).
HELDOUT_SEED_STREAM = 1


def noisy_holdout_split(noisy_labels, fraction, seed):
    """Splits the noisy training set into the ids trained on and the ids held out.

    Model selection without clean data: a stratified share `fraction` of the
    training set, stratified by the *noisy* label, is never trained on and is
    evaluated every epoch against its noisy labels; the epoch where that
    accuracy peaks selects the reported test accuracy. Class j holds out
    `round(fraction * n_j)` of its `n_j` samples (Python's round: halves go to
    the even number). The split is a pure function of `noisy_labels`,
    `fraction` and `seed`, so a resumed run makes the same one.

    Args:
        noisy_labels: int array `[N]`, the labels training would see.
        fraction: float in `[0, 1)`; 0 holds out nothing.
        seed: int, the run's seed.

    Returns:
        `(train_ids, heldout_ids)`, sorted int64 arrays that partition
        `range(N)`.
    """
    from galkeras.datasets.base import stratified_split

    noisy_labels = np.asarray(noisy_labels)
    if not fraction:
        return np.arange(len(noisy_labels), dtype=np.int64), np.zeros(0, np.int64)
    return stratified_split(noisy_labels, fraction, [seed, HELDOUT_SEED_STREAM])


def holdout_problems(noisy_labels, heldout_ids, class_names=None):
    """Messages naming each class that a held-out split leaves without a training
    sample or without a held-out sample (empty when every class present in
    `noisy_labels` has both).

    Args:
        noisy_labels: int array `[N]`.
        heldout_ids: int array, the held-out ids (`noisy_holdout_split`).
        class_names: optional sequence of class names, indexed by class id.
    """
    noisy_labels = np.asarray(noisy_labels)
    held = np.zeros(len(noisy_labels), bool)
    held[np.asarray(heldout_ids, np.int64)] = True
    problems = []
    for label in np.unique(noisy_labels):
        members = noisy_labels == label
        total, heldout = int(members.sum()), int((members & held).sum())
        if 0 < heldout < total:
            continue
        name = str(class_names[label]) if class_names is not None else str(label)
        named = f"class {label}" + (f" ({name!r})" if name != str(label) else "")
        side = "no held-out sample" if heldout == 0 else "no training sample"
        problems.append(f"{named}: {total} noisy-labelled samples, {side}")
    return problems
