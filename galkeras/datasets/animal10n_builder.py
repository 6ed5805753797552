"""The TFDS builder of Animal-10N (imported only when the dataset is loaded)."""

import re

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
        for split in ("training", "testing"):
            if not (root / split).is_dir():
                raise DatasetError(
                    f"animal10n: {root / split} is missing.\n{INSTRUCTIONS}"
                )
        return {
            "train": self._generate_examples(root / "training"),
            "test": self._generate_examples(root / "testing"),
        }

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


def _check_image(path):
    """Decodes `path` once so a corrupt file is named, not buried in TFDS."""
    import tensorflow as tf

    try:
        image = tf.io.decode_jpeg(path.read_bytes(), channels=3)
    except (tf.errors.InvalidArgumentError, OSError) as error:
        raise DatasetError(f"animal10n: cannot decode image {path}: {error}") from error
    if tuple(image.shape) != (64, 64, 3):
        raise DatasetError(f"animal10n: {path} is {tuple(image.shape)}, not 64x64x3.")
