"""Clothing1M: TFDS' builder test suite on a tiny fake release, strict label-file
parsing, on-demand decoding, and a run through `galkeras.train`."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import tiny_run_config

from galkeras import train
from galkeras.datasets import DatasetError, load_dataset
from galkeras.datasets.clothing1m import CLASSES
from galkeras.datasets.clothing1m_builder import Clothing1m
from galkeras.image_files import ImageFiles

SIZES = {"train": 28, "validation": 7, "test": 14}


def write_fake_release(root, sizes=SIZES):
    """A tiny Clothing1M release: JPEGs of varied sizes under images/<a>/<bc>/,
    the two `<key> <label>` files and the three key lists. Returns
    `{split: [(key, label, pixels)]}`; the pixels are the decoded JPEG."""
    rng = np.random.default_rng(0)
    entries = {}
    noisy, clean = [], []
    for split, count in sizes.items():
        entries[split] = []
        for i in range(count):
            key = f"images/{i % 3}/{i % 7:02d}/{split}_{i}.jpg"
            os.makedirs(os.path.join(root, os.path.dirname(key)), exist_ok=True)
            shape = (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3)
            data = tf.io.encode_jpeg(rng.integers(0, 255, shape, dtype=np.uint8))
            with open(os.path.join(root, key), "wb") as f:
                f.write(data.numpy())
            label = i % len(CLASSES)
            entries[split].append((key, label, tf.io.decode_jpeg(data).numpy()))
            (noisy if split == "train" else clean).append(f"{key} {label}")
        with open(os.path.join(root, _list_name(split)), "w") as f:
            f.write("\n".join(key for key, _, _ in entries[split]) + "\n")
    # The first training image also has a clean label, as in the release.
    clean.append(f"{entries['train'][0][0]} 5")
    for name, lines in (("noisy_label_kv.txt", noisy), ("clean_label_kv.txt", clean)):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return entries


def _list_name(split):
    return {
        "train": "noisy_train_key_list.txt",
        "validation": "clean_val_key_list.txt",
        "test": "clean_test_key_list.txt",
    }[split]


_EXAMPLE_DIR = tempfile.mkdtemp(prefix="fake_clothing1m_")
write_fake_release(_EXAMPLE_DIR)


class Clothing1mBuilderTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = Clothing1m
    EXAMPLE_DIR = _EXAMPLE_DIR
    SPLITS = SIZES
    SKIP_CHECKSUMS = True


def _manual(tmp_path):
    return str(tmp_path / "downloads" / "manual")


@pytest.fixture
def release(tmp_path):
    return write_fake_release(_manual(tmp_path)), str(tmp_path)


def test_source_keeps_images_on_disk_and_decodes_them_on_demand(release):
    entries, data_dir = release
    data = load_dataset("clothing1m", data_dir=data_dir, image_size=(16, 16))
    assert isinstance(data.x_train, ImageFiles) and isinstance(data.x_test, ImageFiles)
    assert data.x_train.shape == (28, 16, 16, 3) and data.num_classes == 14
    assert data.class_names == CLASSES and data.augmentation == "resized_crop_flip"
    by_key = {key: (label, pixels) for key, label, pixels in entries["train"]}
    keys = [os.path.relpath(p, _manual_of(data_dir)) for p in data.x_train.paths]
    np.testing.assert_array_equal(data.y_train, [by_key[k][0] for k in keys])
    # Decoding = the JPEG's pixels resized with TF's antialiased bilinear resize.
    label, pixels = by_key[keys[3]]
    expected = tf.image.resize(pixels, (16, 16), antialias=True).numpy()
    decoded = data.x_train[np.array([3])][0]
    assert np.abs(decoded - np.round(expected)).max() <= 1
    test_keys = {key for key, _, _ in entries["test"]}
    assert {os.path.relpath(p, _manual_of(data_dir)) for p in data.x_test.paths} == (
        test_keys
    )


def _manual_of(data_dir):
    return os.path.join(data_dir, "downloads", "manual")


def test_builder_records_clean_labels_where_the_release_has_them(release):
    _, data_dir = release
    load_dataset("clothing1m", data_dir=data_dir)  # prepares
    builder = Clothing1m(data_dir=data_dir)
    rows = list(tfds.as_numpy(builder.as_dataset(split="train")))
    clean = {r["image_path"].decode(): r["clean_label"] for r in rows}
    assert clean["images/0/00/train_0.jpg"] == 5
    assert sum(v != -1 for v in clean.values()) == 1


def test_missing_manual_dir_or_file_names_the_layout(tmp_path):
    with pytest.raises(DatasetError, match="Cysu/noisy_label"):
        load_dataset("clothing1m", data_dir=str(tmp_path / "none"))
    write_fake_release(_manual(tmp_path))
    os.remove(os.path.join(_manual(tmp_path), "clean_test_key_list.txt"))
    with pytest.raises(DatasetError, match="lacks clean_test_key_list.txt"):
        load_dataset("clothing1m", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "file, line, named",
    [
        ("noisy_label_kv.txt", "images/0/00/x.jpg", "expected '<key> <label>'"),
        ("noisy_label_kv.txt", "images/0/00/x.jpg three", "'three' is not an integer"),
        ("noisy_label_kv.txt", "images/0/00/x.jpg 14", "label 14 is outside"),
        ("clean_label_kv.txt", "images/0/00/x.jpg -1", "label -1 is outside"),
        ("noisy_label_kv.txt", "images/0/00/train_0.jpg 2", "repeats line 1"),
        ("noisy_label_kv.txt", "../../etc/passwd 2", "inside the manual directory"),
        ("clean_val_key_list.txt", "images/0/00/a.jpg 3", "expected one image key"),
        ("clean_val_key_list.txt", "images/9/99/none.jpg", "has no label"),
    ],
)
def test_malformed_label_file_line_names_file_and_line(tmp_path, file, line, named):
    write_fake_release(_manual(tmp_path))
    path = os.path.join(_manual(tmp_path), file)
    with open(path) as f:
        number = sum(1 for _ in f) + 1
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(DatasetError) as error:
        load_dataset("clothing1m", data_dir=str(tmp_path))
    assert named in str(error.value)
    assert f"{path}, line {number}" in str(error.value)


def test_missing_image_is_named(tmp_path):
    entries = write_fake_release(_manual(tmp_path))
    missing = os.path.join(_manual(tmp_path), entries["test"][2][0])
    os.remove(missing)
    with pytest.raises(DatasetError, match=f"image {missing} does not exist"):
        load_dataset("clothing1m", data_dir=str(tmp_path))


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    entries = write_fake_release(_manual(tmp_path))
    bad = os.path.join(_manual(tmp_path), entries["train"][4][0])
    with open(bad, "wb") as f:
        f.write(b"<html>not found</html>")
    with pytest.raises(DatasetError) as error:
        load_dataset("clothing1m", data_dir=str(tmp_path))
    assert bad in str(error.value) and "--skip_corrupt_images" in str(error.value)
    data = load_dataset("clothing1m", data_dir=str(tmp_path), skip_corrupt_images=True)
    assert data.skipped_images == 1 and data.num_train == 27
    assert bad not in set(data.x_train.paths)


@pytest.mark.large
def test_training_run_decodes_from_disk_and_exports(tmp_path):
    write_fake_release(_manual(tmp_path))
    config = tiny_run_config(
        tmp_path,
        "clothing1m",
        data_dir=str(tmp_path),
        image_size=(16, 16),
        noise_type="none",
        batch_size=7,
    )
    summary = train.run(config)
    assert summary["dataset"] == "clothing1m" and summary["skipped_images"] == 0
    # Model selection on the clean validation split, test accuracy reported there.
    import csv

    with open(tmp_path / "run" / "history.csv") as f:
        history = list(csv.DictReader(f))
    validation = [float(row["val_student_accuracy"]) for row in history]
    test = [float(row["test_student_accuracy"]) for row in history]
    best = int(np.argmax(validation))
    selection = summary["model_selection"]
    assert selection["epoch"] == best + 1
    assert selection["test_accuracy"] == pytest.approx(100 * test[best])
    assert summary["student"]["last"] == pytest.approx(100 * test[-1])
    serve = tf.saved_model.load(summary["export_path"]).signatures["serving_default"]
    out = serve(image=tf.zeros([2, 16, 16, 3], tf.uint8))
    assert [n.decode() in CLASSES for n in out["class_name"].numpy()] == [True] * 2


DAMAGES = [
    (lambda m: _append(m / "clean_label_kv.txt", "images/0/00/x.jpg 3 4"), "line"),
    (lambda m: (m / "images/1/01/train_1.jpg").write_bytes(b""), "empty file"),
    (lambda m: (m / "noisy_train_key_list.txt").unlink(), "lacks"),
]
DAMAGE_IDS = ["malformed_line", "corrupt_image", "incomplete_manual_dir"]


def _damaged_release(tmp_path, damage):
    manual = tmp_path / "downloads" / "manual"
    write_fake_release(str(manual))
    damage(manual)


@pytest.mark.parametrize("damage, named", DAMAGES, ids=DAMAGE_IDS)
def test_a_bad_release_is_refused_before_training(tmp_path, damage, named):
    # In process; the command line's exit code is the next test's.
    _damaged_release(tmp_path, damage)
    config = train.TrainConfig(
        dataset="clothing1m", data_dir=str(tmp_path), model_dir=str(tmp_path / "run")
    )
    with pytest.raises(train.ConfigError) as refused:
        train.run(config)
    assert named in str(refused.value) and "clothing1m" in str(refused.value)
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.large
def test_cli_bad_release_exits_2_before_training(tmp_path):
    import subprocess
    import sys

    damage, named = DAMAGES[-1]
    _damaged_release(tmp_path, damage)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "galkeras.train",
            "--dataset=clothing1m",
            f"--data_dir={tmp_path}",
            f"--model_dir={tmp_path / 'run'}",
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and named in result.stderr
    assert "clothing1m" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")
