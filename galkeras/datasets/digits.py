"""`digits`: the embedded offline default dataset.

scikit-learn ships 1797 real 8×8 handwritten digits (the UCI optical
recognition set) with its wheel, so this source needs no download. It is the
dataset of the tests and of the quick CPU runs; its labels are clean.
"""

import numpy as np

from galkeras.datasets.base import Dataset, register, stratified_split

# Share of each class held out for the test split.
TEST_FRACTION = 0.2
# Seed of the fixed split; changing it changes every digits result.
SPLIT_SEED = 0


@register("digits")
def load_digits(arg, data_dir, **options):
    """Loads `digits` (1438 train / 359 test, 8×8×1, 10 classes).

    Args:
        arg: unused (a plain source).
        data_dir: unused (the data ships with scikit-learn).

    Returns:
        A `Dataset` whose `y_train_clean` equals `y_train`.
    """
    # Imported here so that listing or checking dataset specs stays cheap.
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    # Pixel values are 0..16; rescale to the 0..255 range of every source.
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_ids, test_ids = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return Dataset(
        name="digits",
        x_train=images[train_ids],
        y_train=labels[train_ids],
        x_test=images[test_ids],
        y_test=labels[test_ids],
        num_classes=10,
        class_names=tuple(str(digit) for digit in range(10)),
        y_train_clean=labels[train_ids].copy(),
        # A ±1-pixel shift; no flip, since a flipped digit is another digit.
        augmentation="crop",
    )
