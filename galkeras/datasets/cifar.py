"""CIFAR-10/100 and their human-noise versions CIFAR-10N/100N, through TFDS.

- `cifar10`, `cifar100`: `tfds.load`; synthetic noise is applied by the trainer.
- `cifar10n`, `cifar100n`: the TFDS builders `cifar10_n` / `cifar100_n`, which
  need a manual download (see `MANUAL_DOWNLOAD`). Their real label sets are
  offered as `noisy_label_sets`; `--noise_type` picks one (`aggre`, `worse`,
  `random1`..`random3` for CIFAR-10N, `noisy` for CIFAR-100N).

All four honour `--data_dir` as the TFDS data directory; the clean labels are kept
for the pseudo-label precision metric.
"""

import numpy as np

from galkeras.datasets.base import (
    Dataset,
    DatasetError,
    StandIn,
    register,
    tfds_manual_dir,
    tfds_split_arrays,
)

CIFAR10N_LABEL_SETS = {
    "aggre": "aggre_label",
    "worse": "worse_label",
    "random1": "random_label1",
    "random2": "random_label2",
    "random3": "random_label3",
}
CIFAR100N_LABEL_SETS = {"noisy": "noise_label"}
REAL_NOISE_TYPES = (*CIFAR10N_LABEL_SETS, *CIFAR100N_LABEL_SETS)

MANUAL_DOWNLOAD = """\
{name} needs a manual download. From https://github.com/UCSC-REAL/cifar-10-100n
get {files}, convert the human-label .npy into a CSV as the TFDS catalog page of
`{tfds_name}` shows, and put the files in <data_dir>/downloads/manual/ (the TFDS
manual directory; set --data_dir). Then re-run: TFDS prepares the dataset once."""
_MANUAL_FILES = {
    "cifar10_n": "'side_info_cifar10N.csv', 'CIFAR-10_human_ordered.npy' and "
    "'image_order_c10.npy'",
    "cifar100_n": "'side_info_cifar100N.csv', 'CIFAR-100_human_ordered.npy' and "
    "'image_order_c100.npy'",
}
# What the TFDS builders read from the manual directory (after the conversion).
_MANUAL_NEEDS = {
    "cifar10_n": (
        "side_info_cifar10N.csv",
        "CIFAR-10_human_annotations.csv",
        "image_order_c10.npy",
    ),
    "cifar100_n": (
        "side_info_cifar100N.csv",
        "CIFAR-100_human_annotations.csv",
        "image_order_c100.npy",
    ),
}


def _check_manual_dir(builder, tfds_name, spec_name, data_dir):
    """Fails fast, before TFDS downloads anything, when a manual file is missing."""
    import os

    if tfds_name not in _MANUAL_NEEDS:
        return
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        return  # already prepared
    manual_dir = tfds_manual_dir(data_dir)
    missing = [
        f
        for f in _MANUAL_NEEDS[tfds_name]
        if not os.path.exists(os.path.join(manual_dir, f))
    ]
    if missing:
        raise DatasetError(
            MANUAL_DOWNLOAD.format(
                name=spec_name, files=_MANUAL_FILES[tfds_name], tfds_name=tfds_name
            )
            + f"\nMissing in {manual_dir}: {', '.join(missing)}."
        )


def _load_tfds(tfds_name, spec_name, data_dir):
    """`{split: {feature: array}}` for train and test, with a clear error offline."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(tfds_name, data_dir=data_dir)
    _check_manual_dir(builder, tfds_name, spec_name, data_dir)
    try:
        splits = tfds.load(tfds_name, split=["train", "test"], data_dir=data_dir)
    except Exception as error:  # tfds raises many types; all mean "not available"
        if tfds_name in _MANUAL_FILES:
            raise DatasetError(
                MANUAL_DOWNLOAD.format(
                    name=spec_name, files=_MANUAL_FILES[tfds_name], tfds_name=tfds_name
                )
                + f"\n(TFDS said: {type(error).__name__}: {error})"
            ) from error
        raise DatasetError(
            f"{spec_name}: TFDS could not load `{tfds_name}` (data_dir={data_dir}): "
            f"{type(error).__name__}: {error}. On a machine without network, "
            f"prepare it once elsewhere with tfds.load('{tfds_name}') and pass that "
            "TFDS directory as --data_dir."
        ) from error
    arrays = [tfds_split_arrays(split) for split in splits]
    names = builder.info.features["label"].names
    return dict(zip(("train", "test"), arrays)), tuple(names)


def _cifar(tfds_name, spec_name, data_dir, label_sets=None):
    splits, class_names = _load_tfds(tfds_name, spec_name, data_dir)
    train, test = splits["train"], splits["test"]
    noisy_sets = None
    if label_sets:
        noisy_sets = {k: np.asarray(train[v]) for k, v in label_sets.items()}
    return Dataset(
        name=spec_name,
        x_train=train["image"],
        y_train=train["label"],
        x_test=test["image"],
        y_test=test["label"],
        num_classes=len(class_names),
        class_names=class_names,
        y_train_clean=np.asarray(train["label"]).copy(),
        noisy_label_sets=noisy_sets,
        augmentation="crop_flip",
    )


@register(
    "cifar10",
    stand_in=StandIn((32, 32, 3), 10, "crop_flip", label_sets=()),
)
def load_cifar10(arg, data_dir, **options):
    """CIFAR-10 (50,000 / 10,000, 32×32×3, 10 classes) through `tfds.load`."""
    return _cifar("cifar10", "cifar10", data_dir)


@register(
    "cifar100",
    stand_in=StandIn((32, 32, 3), 100, "crop_flip", label_sets=()),
)
def load_cifar100(arg, data_dir, **options):
    """CIFAR-100 (fine labels, 100 classes) through `tfds.load`."""
    return _cifar("cifar100", "cifar100", data_dir)


@register(
    "cifar10n",
    stand_in=StandIn(
        (32, 32, 3), 10, "crop_flip", label_sets=tuple(CIFAR10N_LABEL_SETS)
    ),
)
def load_cifar10n(arg, data_dir, **options):
    """CIFAR-10N: CIFAR-10 images with five human label sets (manual download)."""
    return _cifar("cifar10_n", "cifar10n", data_dir, CIFAR10N_LABEL_SETS)


@register(
    "cifar100n",
    stand_in=StandIn(
        (32, 32, 3), 100, "crop_flip", label_sets=tuple(CIFAR100N_LABEL_SETS)
    ),
)
def load_cifar100n(arg, data_dir, **options):
    """CIFAR-100N: CIFAR-100 images with one human label set (manual download)."""
    return _cifar("cifar100_n", "cifar100n", data_dir, CIFAR100N_LABEL_SETS)
