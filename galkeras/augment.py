"""Training-time augmentation with Keras core preprocessing layers.

keras-cv is end-of-life (its last release pins keras-core 0.1.7); Keras core now
holds the same layers and they run faster inside `tf.data`, so galkeras uses them.
"""

import keras
import tensorflow as tf

AUGMENTATIONS = ("none", "crop", "crop_flip")


def make_augment(kind, image_shape, seed=0):
    """A function on a float32 image batch `[N, H, W, C]`, for `tf.data.map`.

    - `none`: identity (returns None, so the pipeline skips the map).
    - `crop`: zero-pad by `max(1, H // 8)` pixels (4 at 32x32, as for CIFAR) and
      take a random crop of the original size.
    - `crop_flip`: the same, then a random horizontal flip.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}; got {kind!r}.")
    if kind == "none":
        return None
    height, width = image_shape[:2]
    pad = max(1, height // 8)
    layers = [keras.layers.RandomCrop(height, width, seed=seed)]
    if kind == "crop_flip":
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 1))

    def augment(images):
        x = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        for layer in layers:
            x = layer(x, training=True)
        return x

    return augment
