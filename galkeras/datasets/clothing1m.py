"""`clothing1m`: Clothing1M (paper Table 3), a TFDS builder over the manual dir.

Clothing1M (Xiao et al., CVPR 2015) has about a million clothing photos from
shopping sites, labelled from their surrounding text (about 38.5% noise), with
14,313 clean validation and 10,526 clean test images. It is obtained from its
authors by request. The builder (`clothing1m_builder.Clothing1m`) prepares a TFDS
dataset of each image's path and label; the JPEGs stay in the manual directory
and are decoded on demand (`galkeras.ImageFiles`), because GAL's batch plan
needs random access and a million decoded images do not fit in memory.
"""

import os

from galkeras.datasets.base import (
    Dataset,
    DatasetError,
    StandIn,
    prepare_manual_builder,
    register,
    tfds_manual_dir,
    tfds_split_arrays,
)

CLASSES = (
    "T-Shirt",
    "Shirt",
    "Knitwear",
    "Chiffon",
    "Sweater",
    "Hoodie",
    "Windbreaker",
    "Jacket",
    "Down Coat",
    "Suit",
    "Shawl",
    "Dress",
    "Vest",
    "Underwear",
)

# Files of the official release, relative to the manual directory.
LABEL_FILES = ("noisy_label_kv.txt", "clean_label_kv.txt")
KEY_LISTS = {
    "train": ("noisy_train_key_list.txt", "noisy_label_kv.txt"),
    "validation": ("clean_val_key_list.txt", "clean_label_kv.txt"),
    "test": ("clean_test_key_list.txt", "clean_label_kv.txt"),
}

INSTRUCTIONS = """\
Clothing1M is obtained from its authors (Xiao et al., CVPR 2015), by request:
https://github.com/Cysu/noisy_label
Unpack the release so that the TFDS manual directory (<data_dir>/downloads/manual/,
set --data_dir) holds
    images/<a>/<bc>/<name>.jpg     (the JPEGs, from images/0.tar ... 9.tar)
    noisy_label_kv.txt             lines 'images/<a>/<bc>/<name>.jpg <label>'
    clean_label_kv.txt             the same format
    noisy_train_key_list.txt       one image key per line (train, noisy labels)
    clean_val_key_list.txt         (validation, clean labels)
    clean_test_key_list.txt        (test, clean labels)
with labels 0-13 in the order: T-Shirt, Shirt, Knitwear, Chiffon, Sweater, Hoodie,
Windbreaker, Jacket, Down Coat, Suit, Shawl, Dress, Vest, Underwear."""

# ImageNet statistics (0-255 scale): Clothing1M fine-tunes an ImageNet ResNet-50.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
DEFAULT_IMAGE_SIZE = (224, 224)


@register(
    "clothing1m",
    stand_in=StandIn(
        (*DEFAULT_IMAGE_SIZE, 3), 14, "resized_crop_flip", validation=True
    ),
)
def load_clothing1m(
    arg, data_dir, image_size=None, skip_corrupt_images=False, **options
):
    """Prepares (once) and loads Clothing1M: labels in memory, images on disk.

    Args:
        arg: unused (`clothing1m` takes no argument).
        data_dir: the TFDS data directory; the release is in its manual dir.
        image_size: `(H, W)` every image is resized to; default 224×224.
        skip_corrupt_images: drop files that are missing, empty or not images
            (counted in `skipped_images`) instead of failing.

    Returns:
        A `Dataset` whose images are `galkeras.ImageFiles`, with the clean
        validation split as `x_val` / `y_val` for model selection.
    """
    from galkeras.datasets.clothing1m_builder import Clothing1m
    from galkeras.image_files import ImageFiles, find_bad_image_files

    builder = Clothing1m(data_dir=data_dir)
    prepare_manual_builder(builder, "clothing1m", INSTRUCTIONS, data_dir)
    manual = tfds_manual_dir(data_dir)
    splits = {}
    skipped = 0
    for split in ("train", "validation", "test"):
        columns = tfds_split_arrays(builder.as_dataset(split=split))
        paths = [os.path.join(manual, key.decode()) for key in columns["image_path"]]
        labels = columns["label"]
        bad = find_bad_image_files(paths)
        if bad and not skip_corrupt_images:
            listed = "\n".join(f"  {paths[i]}: {reason}" for i, reason in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DatasetError(
                f"clothing1m: {len(bad)} {split} image file(s) cannot be read as "
                f"images:\n{listed}{more}\nRestore them from the release, or pass "
                f"--skip_corrupt_images to train without them (counted in "
                f"summary.json)."
            )
        if bad:
            keep = sorted(set(range(len(paths))) - {i for i, _ in bad})
            paths = [paths[i] for i in keep]
            labels = labels[keep]
            skipped += len(bad)
        splits[split] = (
            ImageFiles(paths, tuple(image_size or DEFAULT_IMAGE_SIZE)),
            labels,
        )
    return Dataset(
        name="clothing1m",
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=len(CLASSES),
        class_names=CLASSES,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augmentation="resized_crop_flip",
        skipped_images=skipped,
        x_val=splits["validation"][0],
        y_val=splits["validation"][1],
        train_paths=[os.path.relpath(p, manual) for p in splits["train"][0].paths],
    )
