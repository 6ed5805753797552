"""Augmentation: per-image crops and flips checked against NumPy, reproducible per
seed, and independent of `tf.data`'s thread scheduling."""

import numpy as np
import pytest
import tensorflow as tf

from galkeras.augment import RandomResizedCrop, make_augment
from galkeras.sampling import CDASSampler, paired_dataset

IMAGES = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)


def _augment(kind, seed=(1, 2)):
    return make_augment(kind, (32, 32, 3))(
        tf.constant(IMAGES), tf.constant(seed)
    ).numpy()


def _windows(images, pad=4):
    """Every 32×32 window of each image zero-padded by `pad`: [N, offsets, ...]."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    size = images.shape[1]
    return [
        [
            padded[i, y : y + size, x : x + size]
            for y in range(2 * pad + 1)
            for x in range(2 * pad + 1)
        ]
        for i in range(len(images))
    ]


def test_crop_is_a_zero_padded_crop_at_its_own_offset_per_image():
    out = _augment("crop")
    offsets = []
    for i, windows in enumerate(_windows(IMAGES)):
        matches = [k for k, w in enumerate(windows) if np.array_equal(out[i], w)]
        assert matches, f"image {i} is not a 4-pixel zero-padded crop"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # not one offset for the whole batch


def test_crop_flip_flips_some_images_and_not_others():
    out = _augment("crop_flip")
    flipped = []
    for i, windows in enumerate(_windows(IMAGES)):
        plain = any(np.array_equal(out[i], w) for w in windows)
        mirrored = any(np.array_equal(out[i], w[:, ::-1]) for w in windows)
        assert plain or mirrored
        flipped.append(mirrored and not plain)
    assert 0 < sum(flipped) < len(flipped)


@pytest.mark.parametrize("kind", ["crop", "crop_flip", "resized_crop_flip"])
def test_same_seed_same_output_other_seed_other_output(kind):
    np.testing.assert_array_equal(_augment(kind), _augment(kind))
    assert not np.array_equal(_augment(kind), _augment(kind, seed=(1, 3)))
    assert _augment(kind).shape == IMAGES.shape


def test_resized_crop_boxes_hold_the_area_and_aspect_ranges():
    layer = RandomResizedCrop(scale=(0.25, 0.5), ratio=(0.5, 2.0))
    boxes = layer.boxes(4000, 32, 32, tf.constant([3, 4])).numpy()
    assert boxes.min() >= 0 and boxes.max() <= 1
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, aspect = heights * widths, widths / heights
    unclipped = (heights < 1) & (widths < 1)
    assert np.all((area[unclipped] > 0.25 - 1e-5) & (area[unclipped] < 0.5 + 1e-5))
    assert np.all((aspect[unclipped] > 0.5 - 1e-4) & (aspect[unclipped] < 2 + 1e-4))
    # The whole image, unscaled, is the identity.
    whole = RandomResizedCrop(scale=(1, 1), ratio=(1, 1))(
        IMAGES, seed=tf.constant([0, 0])
    )
    np.testing.assert_allclose(whole, IMAGES, atol=1e-3)


def test_paired_dataset_augmentation_is_reproducible_under_parallel_map():
    labels = np.arange(64) % 4
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), np.uint8)
    sampler = CDASSampler(labels, batch_size=8, seed=5, warmup_steps=0)
    augment = make_augment("crop_flip", (32, 32, 3))

    def run():
        dataset = paired_dataset(sampler, images, labels, start_step=0, augment=augment)
        return [e["image_a"].numpy() for e in dataset.take(8)]

    first, second = run(), run()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # Distinct steps draw distinct transformations (Keras' own seed generator,
    # shared by parallel map calls, can repeat one).
    raw = [images[sampler.plan(s)[0]].astype(np.float32) for s in range(8)]
    diffs = [first[s] - raw[s] for s in range(8)]
    assert all(not np.array_equal(diffs[s], diffs[s + 1]) for s in range(7))


@pytest.mark.parametrize("kind", ["crop", "crop_flip", "resized_crop_flip"])
def test_uint8_batches_augment_as_their_float32_values(kind):
    pixels = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), np.uint8)
    augment = make_augment(kind, (32, 32, 3))
    seed = tf.constant([5, 6])
    got = augment(tf.constant(pixels), seed)
    expected = augment(tf.constant(pixels, tf.float32), seed).numpy()
    # Moving pixels keeps uint8 (exactly); interpolating gives float32.
    assert got.dtype == (tf.float32 if kind == "resized_crop_flip" else tf.uint8)
    np.testing.assert_array_equal(got.numpy().astype(np.float32), expected)
