"""Animal-10N: TFDS' own builder test suite, the galkeras source and a run."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from galkeras.datasets import DatasetError, load_dataset
from galkeras.datasets.animal10n import CLASSES
from galkeras.datasets.animal10n_builder import Animal10n


def write_fake_release(root, per_split=(("training", 20), ("testing", 10))):
    """A tiny fake KAIST release: 64×64 JPEGs named `<label>_<index>.jpg`."""
    rng = np.random.default_rng(0)
    for split, count in per_split:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for i in range(count):
            label = i % len(CLASSES)
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            with open(os.path.join(root, split, f"{label}_{i}.jpg"), "wb") as f:
                f.write(tf.io.encode_jpeg(image).numpy())
    return root


def write_fake_binary_release(
    root,
    counts=(("data_batch_1", 12), ("data_batch_2", 8), ("test_batch", 10)),
    byteorder="<",
):
    """A tiny fake binary release. Returns `{file: (ids, labels, images HWC)}`."""
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    written = {}
    for name, count in counts:
        ids = np.arange(count) + 1000 * len(written)
        labels = np.arange(count) % len(CLASSES)
        images = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
        header = np.stack([ids, labels], axis=1).astype(f"{byteorder}i4")
        records = np.concatenate(
            [
                header.view(np.uint8).reshape(count, 8),
                images.transpose(0, 3, 1, 2).reshape(count, -1),
            ],
            axis=1,
        )
        with open(os.path.join(root, f"{name}.bin"), "wb") as f:
            f.write(records.tobytes())
        written[name] = (ids, labels, images)
    return written


class Animal10nBinaryBuilderTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = Animal10n
    EXAMPLE_DIR = tempfile.mkdtemp(prefix="fake_animal10n_bin_")
    SPLITS = {"train": 20, "test": 10}
    SKIP_CHECKSUMS = True


write_fake_binary_release(Animal10nBinaryBuilderTest.EXAMPLE_DIR)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_binary_release_pixels_and_labels_round_trip(tmp_path, byteorder):
    written = write_fake_binary_release(
        str(tmp_path / "downloads" / "manual"), byteorder=byteorder
    )
    data = load_dataset("animal10n", data_dir=str(tmp_path))
    for images, labels, parts in (
        (data.x_train, data.y_train, ("data_batch_1", "data_batch_2")),
        (data.x_test, data.y_test, ("test_batch",)),
    ):
        expected = {
            written[p][2][i].tobytes(): written[p][1][i]
            for p in parts
            for i in range(len(written[p][1]))
        }
        assert len(images) == len(expected)
        for image, label in zip(images, labels):
            assert expected[image.tobytes()] == label  # exact pixels, right label


def test_binary_release_bad_size_or_label_is_named(tmp_path):
    manual = tmp_path / "a" / "downloads" / "manual"
    write_fake_binary_release(str(manual))
    with open(manual / "data_batch_2.bin", "ab") as f:
        f.write(b"xyz")
    with pytest.raises(DatasetError, match="data_batch_2.bin is .* not a whole"):
        load_dataset("animal10n", data_dir=str(tmp_path / "a"))
    manual = tmp_path / "b" / "downloads" / "manual"
    write_fake_binary_release(str(manual))
    data = bytearray((manual / "test_batch.bin").read_bytes())
    data[4 + 2 * 12296 : 8 + 2 * 12296] = (10).to_bytes(4, "little")
    (manual / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="test_batch.bin, record 2: label"):
        load_dataset("animal10n", data_dir=str(tmp_path / "b"))


class Animal10nBuilderTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = Animal10n
    EXAMPLE_DIR = write_fake_release(tempfile.mkdtemp(prefix="fake_animal10n_"))
    SPLITS = {"train": 20, "test": 10}
    SKIP_CHECKSUMS = True


def _data_dir(tmp_path):
    write_fake_release(str(tmp_path / "downloads" / "manual"))
    return str(tmp_path)


def test_source_prepares_once_and_loads(tmp_path):
    data_dir = _data_dir(tmp_path)
    data = load_dataset("animal10n", data_dir=data_dir)
    assert data.x_train.shape == (20, 64, 64, 3) and data.x_test.shape == (
        10,
        64,
        64,
        3,
    )
    assert data.class_names == CLASSES and data.augmentation == "crop_flip"
    assert sorted(np.bincount(data.y_train)) == [2] * 10
    again = load_dataset("animal10n", data_dir=data_dir)  # prepared: no re-read
    np.testing.assert_array_equal(np.sort(again.y_test), np.sort(data.y_test))


def test_missing_or_incomplete_manual_dir_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="dm.kaist.ac.kr"):
        load_dataset("animal10n", data_dir=str(tmp_path / "empty"))
    write_fake_release(
        str(tmp_path / "half" / "downloads" / "manual"), per_split=(("training", 4),)
    )
    with pytest.raises(DatasetError) as error:
        load_dataset("animal10n", data_dir=str(tmp_path / "half"))
    assert "testing" in str(error.value) and "training/<label>_<index>.jpg" in str(
        error.value
    )


def test_corrupt_image_is_named(tmp_path):
    data_dir = _data_dir(tmp_path)
    bad = tmp_path / "downloads" / "manual" / "training" / "3_999.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="3_999.jpg"):
        load_dataset("animal10n", data_dir=data_dir)


def test_a_run_end_to_end_exports_class_names(tmp_path):
    # `python -m galkeras.train --dataset=animal10n` is this config; the CLI's
    # own path is tested on digits in train_test.
    from conftest import tiny_run_config

    from galkeras import train

    config = tiny_run_config(
        tmp_path,
        "animal10n",
        data_dir=str(_data_dir(tmp_path)),
        noise_type="none",
        lr_decay_epochs=(1,),
    )
    summary = train.run(config)
    serve = tf.saved_model.load(summary["export_path"]).signatures["serving_default"]
    out = serve(image=tf.zeros([3, 64, 64, 3], tf.uint8))
    names = [n.decode() for n in out["class_name"].numpy()]
    assert all(n in CLASSES for n in names)
    assert names == [CLASSES[i] for i in out["class_id"].numpy()]
