"""The TFDS builder of Clothing1M (imported only when the dataset is loaded)."""

import posixpath

import numpy as np
import tensorflow_datasets as tfds

from galkeras.datasets.base import DatasetError
from galkeras.datasets.clothing1m import (
    CLASSES,
    INSTRUCTIONS,
    KEY_LISTS,
    LABEL_FILES,
)


class Clothing1m(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of Clothing1M from its official release in the manual dir.

    Each example is an image's key (its path relative to the manual directory),
    its label and, where the release has one, its clean label (-1 otherwise).
    The JPEGs are not copied into the prepared dataset: galkeras decodes them
    from the manual directory on demand.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image_path": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                    "clean_label": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image_path", "label"),
            homepage="https://github.com/Cysu/noisy_label",
        )

    def _split_generators(self, dl_manager):
        # TFDS builders use epath (tf.io.gfile underneath), not `os`: the
        # manual dir may be on GCS.
        root = dl_manager.manual_dir
        needed = [*LABEL_FILES, *(f for f, _ in KEY_LISTS.values()), "images"]
        missing = [f for f in needed if not (root / f).exists()]
        if missing:
            raise DatasetError(
                f"clothing1m: the manual directory {root} lacks "
                f"{', '.join(missing)}.\n{INSTRUCTIONS}"
            )
        kv = {name: read_label_file(root / name) for name in LABEL_FILES}
        clean = kv["clean_label_kv.txt"]
        splits = {}
        for split, (list_name, kv_name) in KEY_LISTS.items():
            list_path = root / list_name
            examples = []
            for line_number, key in read_key_list(list_path):
                if key not in kv[kv_name]:
                    raise DatasetError(
                        f"clothing1m: {list_path}, line {line_number}: key {key!r} "
                        f"has no label in {root / kv_name}."
                    )
                if not (root / key).is_file():
                    raise DatasetError(
                        f"clothing1m: {list_path}, line {line_number}: image "
                        f"{root / key} does not exist."
                    )
                examples.append((key, kv[kv_name][key], clean.get(key, -1)))
            if not examples:
                raise DatasetError(f"clothing1m: {list_path} lists no images.")
            splits[split] = self._generate_examples(examples)
        return splits

    def _generate_examples(self, examples):
        for key, label, clean_label in examples:
            yield key, {"image_path": key, "label": label, "clean_label": clean_label}


def _lines(path):
    """`(line_number, fields)` of each non-blank line of a text file (an
    `epath.Path`)."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                yield number, fields


def _check_key(path, number, key):
    if posixpath.isabs(key) or ".." in key.replace("\\", "/").split("/"):
        raise DatasetError(
            f"clothing1m: {path}, line {number}: key {key!r} must be a path inside "
            f"the manual directory (relative, no '..')."
        )


def read_label_file(path):
    """A `<key> <label>` file (`noisy_label_kv.txt`, `clean_label_kv.txt`) as a
    dict. Refuses, naming the file and line: a wrong number of fields, a label
    that is not an integer in [0, 14), a key escaping the directory, a key twice.
    """
    labels, first_line = {}, {}
    for number, fields in _lines(path):
        if len(fields) != 2:
            raise DatasetError(
                f"clothing1m: {path}, line {number}: expected '<key> <label>', got "
                f"{len(fields)} field(s): {' '.join(fields)!r}."
            )
        key, text = fields
        _check_key(path, number, key)
        try:
            label = int(text)
        except ValueError:
            raise DatasetError(
                f"clothing1m: {path}, line {number}: label {text!r} is not an integer."
            ) from None
        if not 0 <= label < len(CLASSES):
            raise DatasetError(
                f"clothing1m: {path}, line {number}: label {label} is outside "
                f"[0, {len(CLASSES)})."
            )
        if key in labels:
            raise DatasetError(
                f"clothing1m: {path}, line {number}: key {key!r} repeats line "
                f"{first_line[key]}."
            )
        labels[key] = label
        first_line[key] = number
    return labels


def read_key_list(path):
    """The `(line_number, key)` pairs of a key list, one key per line."""
    keys, first_line = [], {}
    for number, fields in _lines(path):
        if len(fields) != 1:
            raise DatasetError(
                f"clothing1m: {path}, line {number}: expected one image key, got "
                f"{len(fields)} fields."
            )
        key = fields[0]
        _check_key(path, number, key)
        if key in first_line:
            raise DatasetError(
                f"clothing1m: {path}, line {number}: key {key!r} repeats line "
                f"{first_line[key]}."
            )
        first_line[key] = number
        keys.append((number, key))
    return keys
