"""Training-time augmentation with Keras core preprocessing layers.

keras-cv is end-of-life (its last release pins keras-core 0.1.7); Keras core now
holds the same layers and they run faster inside `tf.data`, so galkeras uses them.

The layers do the image work (`transform_images`), but galkeras draws their random
transformations itself, statelessly, from a seed that is a function of the run's
seed, the global step and the twin. Two measured reasons:

- a layer's own `SeedGenerator` is a variable that parallel `tf.data` map calls
  race on, so two batches can get the same "random" transformation and a run is
  not reproducible;
- Keras' `RandomCrop` crops a whole batch at one offset; CIFAR's augmentation
  crops each image at its own offset, which `RandomTranslation` with whole-pixel
  shifts and zero fill does exactly.

Keras core has no random resized crop, so `RandomResizedCrop` here is one.
"""

import math

import keras
import tensorflow as tf

AUGMENTATIONS = ("none", "crop", "crop_flip", "resized_crop_flip")


class RandomResizedCrop(keras.layers.Layer):
    """Inception-style random resized crop of an image batch, back to its size.

    Each image gets its own box: its area is a share `s ~ U(scale)` of the
    image's and its aspect ratio (width / height) is `r`, with `log r ~
    U(log ratio)` (torchvision's defaults). A box larger than the image along
    one side is clipped to it. The box is placed uniformly at random and
    resized back to the input's `(H, W)` with bilinear interpolation.

    Args:
        scale: `(low, high)`, the range of the box's share of the area.
        ratio: `(low, high)`, the range of the box's aspect ratio.
        seed: int or None; the seed of calls without an explicit `seed`.
    """

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1; got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high; got {ratio}.")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.seed = seed

    def boxes(self, batch, height, width, seed):
        """Normalised crop boxes `[batch, 4]` drawn from the stateless `seed`."""
        draws = tf.random.stateless_uniform((4, batch), seed)
        low, high = self.scale
        area = (low + (high - low) * draws[0]) * float(height * width)
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = tf.exp(log_low + (log_high - log_low) * draws[1])
        box_h = tf.minimum(tf.sqrt(area / aspect) / height, 1.0)
        box_w = tf.minimum(tf.sqrt(area * aspect) / width, 1.0)
        top = draws[2] * (1.0 - box_h)
        left = draws[3] * (1.0 - box_w)
        return tf.stack([top, left, top + box_h, left + box_w], axis=1)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        if seed is None:
            seed = tf.constant([self.seed or 0, 0], tf.int64)
        batch = tf.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        return tf.image.crop_and_resize(
            tf.cast(images, tf.float32),
            self.boxes(batch, height, width, seed),
            tf.range(batch),
            (height, width),
            method="bilinear",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "scale": self.scale,
            "ratio": self.ratio,
            "seed": self.seed,
        }


class Augment:
    """A seeded augmentation: `augment(images, seed)` on an image batch.

    A uint8 batch comes back uint8 from `crop` and `crop_flip` (they only move
    pixels) and float32 from `resized_crop_flip` (bilinear values); any other
    batch comes back float32.

    `seed` is a stateless seed (int `[2]`); the same images and seed always give
    the same output, whichever `tf.data` thread runs it. `paired_dataset`
    passes a seed made of the run's seed, the global step and the twin.

    Args:
        kind: one of `AUGMENTATIONS` other than `none`:
            - `crop`: shift each image by a whole number of pixels in
              `[-p, p]` along each axis, filling with zeros, where
              `p = max(1, H // 8)` (4 at 32×32). This is exactly CIFAR's
              "zero-pad by p, random crop"; done by `keras.layers.RandomTranslation`.
            - `crop_flip`: the same, then a random horizontal flip per image
              (`keras.layers.RandomFlip`).
            - `resized_crop_flip`: `RandomResizedCrop` (area 8–100%, aspect
              3/4–4/3), then the flip; for large photos (Clothing1M).
        image_shape: `(H, W, C)` of the images.
    """

    takes_seed = True
    takes_uint8 = True

    def __init__(self, kind, image_shape):
        if kind not in AUGMENTATIONS or kind == "none":
            raise ValueError(
                f"Augment kind must be one of {AUGMENTATIONS[1:]}; got {kind!r}."
            )
        self.kind = kind
        self.height, self.width = image_shape[:2]
        self.pad = max(1, self.height // 8)
        self.translate = keras.layers.RandomTranslation(
            self.pad / self.height,
            self.pad / self.width,
            fill_mode="constant",
            interpolation="nearest",
            fill_value=0.0,
        )
        self.flip = keras.layers.RandomFlip("horizontal")
        self.resized_crop = RandomResizedCrop()

    def __call__(self, images, seed):
        stored = images.dtype
        images = tf.cast(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
        batch = tf.shape(images)[0]
        if self.kind == "resized_crop_flip":
            images = self.resized_crop(images, seed=seeds[0])
        else:
            shifts = tf.random.stateless_uniform(
                (batch, 2), seeds[1], -self.pad, self.pad + 1, dtype=tf.int32
            )
            images = self.translate.transform_images(
                images,
                {
                    "translations": tf.cast(shifts, tf.float32),
                    "input_shape": tf.shape(images),
                },
                training=True,
            )
        if self.kind in ("crop_flip", "resized_crop_flip"):
            flips = tf.random.stateless_uniform((batch, 1, 1, 1), seeds[2]) < 0.5
            images = self.flip.transform_images(
                images, {"flips": flips, "input_shape": tf.shape(images)}, training=True
            )
        if stored == tf.uint8 and self.kind != "resized_crop_flip":
            # Whole-pixel shifts, zero fill and flips only move pixels: back to
            # uint8 exactly, a quarter of the bytes to the device.
            return tf.cast(images, tf.uint8)
        return images


def make_augment(kind, image_shape):
    """`Augment(kind, image_shape)`, or None for `none` (the pipeline skips it)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}; got {kind!r}.")
    return None if kind == "none" else Augment(kind, image_shape)
