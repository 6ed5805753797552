"""The TFDS builder of Animal-10N (imported only when the dataset is loaded)."""

import re

import numpy as np
import tensorflow_datasets as tfds

from galkeras.datasets.animal10n import CLASSES, INSTRUCTIONS
from galkeras.datasets.base import DatasetError

_NAME = re.compile(r"^(\d+)_\d+\.jpe?g$", re.IGNORECASE)


class Animal10n(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of Animal-10N from its manual-download JPEG folders."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(64, 64, 3)),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://dm.kaist.ac.kr/datasets/animal-10n/",
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        if (root / "training").is_dir() and (root / "testing").is_dir():
            return {
                "train": self._generate_examples(root / "training"),
                "test": self._generate_examples(root / "testing"),
            }
        batches = sorted(root.glob("data_batch_*.bin"))
        if batches and (root / "test_batch.bin").exists():
            return {
                "train": self._generate_binary_examples(batches),
                "test": self._generate_binary_examples([root / "test_batch.bin"]),
            }
        raise DatasetError(
            f"animal10n: {root} holds neither training/ and testing/ (the JPEG "
            f"release) nor data_batch_*.bin and test_batch.bin (the binary "
            f"release).\n{INSTRUCTIONS}"
        )

    def _generate_examples(self, directory):
        for path in sorted(directory.iterdir()):
            match = _NAME.match(path.name)
            if not match:
                continue
            label = int(match.group(1))
            if not 0 <= label < len(CLASSES):
                raise DatasetError(
                    f"animal10n: {path} has label {label}, outside [0, {len(CLASSES)})."
                )
            _check_image(path)
            yield path.name, {"image": path, "label": label, "id": path.name}

    def _generate_binary_examples(self, paths):
        for path in paths:
            ids, labels, images = read_binary_batch(path)
            for record, (image_id, label, image) in enumerate(zip(ids, labels, images)):
                key = f"{path.name}:{record}"
                yield key, {"image": image, "label": label, "id": str(image_id)}


_RECORD_BYTES = 4 + 4 + 3 * 64 * 64


def read_binary_batch(path):
    """One file of Animal-10N's binary release as `(ids, labels, images)`.

    A record is a 4-byte image id, a 4-byte label and a 3×64×64 image stored
    depth-major (all red, then green, then blue rows). The release does not say
    the integers' byte order: little-endian is read first, big-endian if that
    gives labels outside [0, 10) and it does not.

    Returns:
        int64 ids `[n]`, int64 labels `[n]`, uint8 images `[n, 64, 64, 3]`.

    Raises:
        DatasetError: for a size that is not a whole number of records or a
            label outside [0, 10) in either byte order, naming the file.
    """
    data = np.frombuffer(path.read_bytes(), np.uint8)
    if data.size == 0 or data.size % _RECORD_BYTES:
        raise DatasetError(
            f"animal10n: {path} is {data.size} bytes, not a whole number of "
            f"{_RECORD_BYTES}-byte records (4-byte id, 4-byte label, 3x64x64 image)."
        )
    records = data.reshape(-1, _RECORD_BYTES)
    header = np.ascontiguousarray(records[:, :8])

    def read(order):
        fields = header.view(f"{order}i4").astype(np.int64)
        bad = np.flatnonzero((fields[:, 1] < 0) | (fields[:, 1] >= len(CLASSES)))
        return fields, bad

    fields, bad = read("<")
    if bad.size:
        big_endian, big_bad = read(">")
        if big_bad.size:
            raise DatasetError(
                f"animal10n: {path}, record {bad[0]}: label {fields[bad[0], 1]} is "
                f"outside [0, {len(CLASSES)}) (read little-endian; big-endian fails "
                f"too)."
            )
        fields = big_endian
    labels = fields[:, 1]
    images = records[:, 8:].reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1)
    return fields[:, 0], labels, np.ascontiguousarray(images)


def _check_image(path):
    """Decodes `path` once so a corrupt file is named, not buried in TFDS."""
    import tensorflow as tf

    try:
        image = tf.io.decode_jpeg(path.read_bytes(), channels=3)
    except (tf.errors.InvalidArgumentError, OSError) as error:
        raise DatasetError(f"animal10n: cannot decode image {path}: {error}") from error
    if tuple(image.shape) != (64, 64, 3):
        raise DatasetError(f"animal10n: {path} is {tuple(image.shape)}, not 64x64x3.")
