"""`ImageFiles`: on-disk images decode to the pixels written, and the CDAS,
refresh and evaluation pipelines give the same batches from files as from arrays."""

import os

import numpy as np
import pytest
import tensorflow as tf

from galkeras.image_files import ImageFiles, find_bad_image_files
from galkeras.sampling import (
    CDASSampler,
    evaluation_dataset,
    inference_dataset,
    paired_dataset,
)
from galkeras.training_set import TrainingSet


@pytest.fixture
def files(tmp_path):
    """48 lossless PNGs of 8×8×3 and the arrays they hold."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        path.write_bytes(tf.io.encode_png(image).numpy())
        paths.append(path)
    labels = np.arange(48) % 4
    return ImageFiles(paths, (8, 8)), images, labels


def test_decodes_to_the_written_pixels_and_resizes(files, tmp_path):
    image_files, images, _ = files
    assert image_files.shape == (48, 8, 8, 3) and len(image_files) == 48
    np.testing.assert_array_equal(image_files[np.arange(5, 9)], images[5:9])
    np.testing.assert_array_equal(
        image_files.subset([7, 2])[np.arange(2)], images[[7, 2]]
    )
    small = ImageFiles(image_files.paths[:2], (4, 4))[np.arange(2)]
    expected = tf.image.resize(images[:2], (4, 4), antialias=True).numpy()
    assert small.dtype == np.uint8 and np.abs(small - np.round(expected)).max() <= 1
    grey = ImageFiles(image_files.paths[:1], (8, 8), channels=1)[np.arange(1)]
    assert grey.shape == (1, 8, 8, 1)


def test_rejects_bad_arguments(files):
    image_files, _, _ = files
    with pytest.raises(ValueError, match="non-empty"):
        ImageFiles([], (8, 8))
    with pytest.raises(ValueError, match="image_size"):
        ImageFiles(image_files.paths, (8, 0))
    with pytest.raises(ValueError, match="channels"):
        ImageFiles(image_files.paths, (8, 8), channels=4)


def test_paired_batches_from_files_equal_those_from_arrays(files):
    image_files, images, labels = files
    sampler = CDASSampler(labels, batch_size=8, seed=4, warmup_steps=2)
    from_files = paired_dataset(sampler, image_files, labels, start_step=0)
    from_arrays = paired_dataset(sampler, images, labels, start_step=0)
    for a, b in zip(from_files.take(5), from_arrays.take(5)):  # warm-up and CDAS
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert from_files.element_spec == from_arrays.element_spec


def test_refresh_and_evaluation_walk_the_files_in_order(files):
    image_files, images, labels = files
    batches = list(inference_dataset(image_files, batch_size=20))
    assert [len(b["id"]) for b in batches] == [20, 20, 8]
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in batches]), images.astype(np.float32)
    )
    triples = list(evaluation_dataset(image_files, labels, batch_size=20))
    real = np.concatenate([w for *_, w in triples]) == 1  # the last batch padded
    assert real.shape == (60,) and real.sum() == 48
    np.testing.assert_array_equal(
        np.concatenate([x for x, *_ in triples])[real], images
    )
    np.testing.assert_array_equal(
        np.concatenate([y for _, y, _ in triples])[real], labels
    )
    with pytest.raises(ValueError, match="must match"):
        evaluation_dataset(image_files, labels[:-1], batch_size=4)


def test_training_set_accepts_files(files):
    image_files, _, labels = files
    training_set = TrainingSet(image_files, labels, batch_size=16)
    assert training_set.num_examples == 48 and training_set.steps_per_epoch == 3


def test_find_bad_image_files_names_missing_empty_and_non_images(files, tmp_path):
    image_files, _, _ = files
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_bytes(b"<html>")
    paths = [*image_files.paths[:2], tmp_path / "empty.jpg", tmp_path / "gone.jpg"]
    paths.append(tmp_path / "page.jpg")
    bad = find_bad_image_files([os.fspath(p) for p in paths])
    assert [i for i, _ in bad] == [2, 3, 4]
    assert bad[0][1] == "empty file" and "not a JPEG" in bad[2][1]
