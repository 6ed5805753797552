"""Backbone factories: each returns a fresh, built Keras classifier that outputs logits.

Every backbone takes raw pixels in the 0-255 scale (float or uint8) under the input
name `image` and normalises them itself with the dataset's per-channel mean and
standard deviation, so the exported model needs no preprocessing outside it.
"""

import keras

BACKBONES = ("small_cnn",)


def _normalisation(mean, std):
    """`(x - mean) / std` per channel, as a serialisable `Rescaling` layer."""
    scale = [1.0 / s for s in std]
    offset = [-m / s for m, s in zip(mean, std)]
    return keras.layers.Rescaling(scale=scale, offset=offset, name="normalise")


def small_cnn(
    input_shape, num_classes, mean, std, width=32, hidden_units=0, name="small_cnn"
):
    """A small VGG-style CNN: two blocks of two 3x3 conv-BN-ReLU, then a linear head.

    With the default width it has about 70 k parameters, sized for the 8x8 `digits`
    default and for tests; `width` scales every layer (over-parameterised variants
    memorise noisy labels, which the memorisation benchmark needs).

    Args:
        input_shape: `(H, W, C)`.
        num_classes: number of output logits K.
        mean, std: per-channel normalisation in the 0-255 pixel scale.
        width: channels of the first block; the second block has twice as many.
        hidden_units: if > 0, a hidden dense layer (BN, ReLU) of this size before
            the head, on the flattened feature map: cheap extra capacity.
        name: model name.

    Returns:
        A functional `keras.Model` mapping images to `[N, K]` logits.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _normalisation(mean, std)(inputs)
    for block, channels in enumerate((width, 2 * width)):
        for conv in range(2):
            x = keras.layers.Conv2D(
                channels, 3, padding="same", use_bias=False, name=f"conv{block}_{conv}"
            )(x)
            x = keras.layers.BatchNormalization(name=f"bn{block}_{conv}")(x)
            x = keras.layers.ReLU()(x)
        if x.shape[1] >= 4:
            x = keras.layers.MaxPooling2D(name=f"pool{block}")(x)
    if hidden_units:
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(hidden_units, use_bias=False, name="hidden")(x)
        x = keras.layers.BatchNormalization(name="bn_hidden")(x)
        x = keras.layers.ReLU()(x)
    else:
        x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def build_backbone(kind, input_shape, num_classes, mean, std, **kwargs):
    """Builds the backbone `kind` (one of `BACKBONES`); kwargs go to its factory."""
    factories = {"small_cnn": small_cnn}
    if kind not in factories:
        raise ValueError(f"Unknown backbone {kind!r}; choose one of {BACKBONES}.")
    return factories[kind](input_shape, num_classes, mean, std, **kwargs)
