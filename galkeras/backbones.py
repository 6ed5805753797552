"""Backbone factories: each returns a fresh, built Keras classifier that outputs logits.

The paper's backbones (§4.1.2) are `preact_resnet18` for CIFAR-10/100, `resnet34`
for Animal-10N and `resnet50` (ImageNet-pretrained) for Clothing1M; `small_cnn` is
for the offline default dataset and for tests.

Every backbone is a functional `keras.Model` whose single input, named `image`,
takes raw pixels in the 0-255 scale (float or uint8). It normalises them itself,
with the dataset's per-channel mean and standard deviation (or, for pretrained
ResNet-50 weights, the way those weights expect), so the exported model needs no
preprocessing outside it. It outputs `[N, K]` logits, without softmax, in float32
even under a mixed-precision policy. Weight decay lives in the optimizer, so no
layer has a regularizer.

Inner layers have explicit names, unique within a model and the same in every
model of one architecture (never global state), so GAL's three networks can be
built side by side and the twins' variables share paths.
"""

import os

import keras

BACKBONES = ("small_cnn", "preact_resnet18", "resnet34", "resnet50")

_DEFAULT_WIDTH = {"small_cnn": 32, "preact_resnet18": 64, "resnet34": 64}

# PyTorch's BatchNorm2d defaults: its running-average momentum 0.1 is Keras' 0.9.
# The ResNets' reference code is PyTorch, so their BatchNorm layers use these.
_TORCH_BN = {"momentum": 0.9, "epsilon": 1e-5}


def _normalisation(mean, std):
    """`(x - mean) / std` per channel, as a serialisable `Rescaling` layer."""
    scale = [1.0 / s for s in std]
    offset = [-m / s for m, s in zip(mean, std)]
    return keras.layers.Rescaling(scale=scale, offset=offset, name="normalise")


@keras.saving.register_keras_serializable(package="galkeras")
class CaffePreprocessing(keras.layers.Layer):
    """`keras.applications.resnet50.preprocess_input` as a layer.

    Caffe-style: RGB to BGR, then subtract the ImageNet mean pixel
    `[103.939, 116.779, 123.68]` (BGR order), without scaling. The ImageNet weights
    of `keras.applications.ResNet50` expect this. As a registered layer it keeps
    `.keras` files and SavedModel exports self-contained: they take raw 0-255 RGB.

    Example:

    ```python
    layer = CaffePreprocessing()
    layer(np.full((1, 2, 2, 3), 255.0))  # [151.32, 138.221, 131.061] per pixel
    ```
    """

    BGR_MEAN = (103.939, 116.779, 123.68)

    def build(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(
                f"CaffePreprocessing needs 3 (RGB) channels, got shape {input_shape}."
            )

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        mean = keras.ops.convert_to_tensor(self.BGR_MEAN, dtype=self.compute_dtype)
        return keras.ops.flip(images, axis=-1) - mean

    def compute_output_shape(self, input_shape):
        return input_shape


def _check_width(width):
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r} must be a positive integer.")


def _batch_norm(x, name):
    return keras.layers.BatchNormalization(**_TORCH_BN, name=name)(x)


def _conv3x3(x, filters, stride, name):
    """A 3x3 convolution without bias, padded like PyTorch's `padding=1`.

    TF's "same" padding pads a stride-2 convolution on the bottom and right only,
    which centres its windows one pixel off the samples of the 1x1 stride-2
    shortcut. Padding 1 on every side keeps both paths aligned, as in the
    reference code.
    """
    if stride == 1:
        conv = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=name
        )
        return conv(x)
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, 3, strides=stride, use_bias=False, name=name)(x)


def _shortcut_conv(x, filters, stride, name):
    return keras.layers.Conv2D(
        filters, 1, strides=stride, use_bias=False, name=f"{name}_shortcut_conv"
    )(x)


def _preact_block(x, filters, stride, name):
    """PreAct basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a 1x1 convolution (no BN) of the
    pre-activated input, as in kuangliu/pytorch-cifar's `PreActBlock`.
    """
    out = _batch_norm(x, f"{name}_bn1")
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _shortcut_conv(out, filters, stride, name)
    else:
        shortcut = x
    out = _conv3x3(out, filters, stride, f"{name}_conv1")
    out = _batch_norm(out, f"{name}_bn2")
    out = keras.layers.ReLU(name=f"{name}_relu2")(out)
    out = _conv3x3(out, filters, 1, f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def _basic_block(x, filters, stride, name):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, add, ReLU.

    When the shape changes, the shortcut is a 1x1 convolution plus BN
    (torchvision's `BasicBlock` with its `downsample`).
    """
    out = _conv3x3(x, filters, stride, f"{name}_conv1")
    out = _batch_norm(out, f"{name}_bn1")
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    out = _conv3x3(out, filters, 1, f"{name}_conv2")
    out = _batch_norm(out, f"{name}_bn2")
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _shortcut_conv(x, filters, stride, name)
        shortcut = _batch_norm(shortcut, f"{name}_shortcut_bn")
    else:
        shortcut = x
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(out)


def _stages(x, block, depths, width):
    """Four stages of `block`, with `width * (1, 2, 4, 8)` channels and strides
    (1, 2, 2, 2); the first block of a stage carries its stride."""
    for stage, (depth, stride) in enumerate(zip(depths, (1, 2, 2, 2)), start=1):
        for index in range(depth):
            x = block(
                x,
                width * 2 ** (stage - 1),
                stride if index == 0 else 1,
                f"stage{stage}_block{index + 1}",
            )
    return x


def _head(x, num_classes):
    """Global average pooling and a linear layer; float32 logits under any policy."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)


def small_cnn(
    input_shape, num_classes, mean, std, width=32, hidden_units=0, name="small_cnn"
):
    """A small VGG-style CNN: two blocks of two 3x3 conv-BN-ReLU, then a linear head.

    With the default width it has about 70 k parameters, sized for the 8x8 `digits`
    default and for tests; `width` scales every layer (over-parameterised variants
    memorise noisy labels, which the memorisation benchmark needs). Not one of the
    paper's backbones.

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
    _check_width(width)
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
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def preact_resnet18(
    input_shape, num_classes, mean, std, width=64, name="preact_resnet18"
):
    """Pre-activation ResNet-18 with the CIFAR stem: the paper's CIFAR backbone.

    Exactly kuangliu/pytorch-cifar's `PreActResNet18`: one 3x3 stride-1 convolution
    (no BN, no max-pool), then four stages of two PreAct basic blocks
    (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with `width * (1, 2, 4, 8)` channels and
    strides (1, 2, 2, 2). Where the shape changes, the shortcut is a 1x1 stride-s
    convolution without BN of the block's pre-activated input. There is no final
    BN-ReLU: the last block's sum goes straight to global average pooling (the
    reference's `avg_pool2d(out, 4)`, the same thing on 32x32 inputs), then a
    linear layer. Convolutions have no bias; BatchNorm uses PyTorch's defaults
    (momentum 0.9 in Keras' convention, epsilon 1e-5). About 11.17 M trainable
    parameters for 10 classes at the default width.

    Args:
        input_shape: `(H, W, C)`, e.g. `(32, 32, 3)`.
        num_classes: number of output logits K.
        mean, std: per-channel normalisation in the 0-255 pixel scale.
        width: channels of the stem and the first stage (the reference: 64).
        name: model name.

    Returns:
        A functional `keras.Model` mapping images to `[N, K]` logits.

    Reference:
        He, Zhang, Ren, Sun. "Identity Mappings in Deep Residual Networks",
        ECCV 2016 (arXiv:1603.05027).
    """
    _check_width(width)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _normalisation(mean, std)(inputs)
    x = _conv3x3(x, width, 1, "stem_conv")
    x = _stages(x, _preact_block, (2, 2, 2, 2), width)
    return keras.Model(inputs, _head(x, num_classes), name=name)


def resnet34(input_shape, num_classes, mean, std, width=64, name="resnet34"):
    """ResNet-34 with a CIFAR-style stem: the paper's Animal-10N backbone.

    Post-activation basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add, ReLU) in four
    stages of [3, 4, 6, 3] blocks with `width * (1, 2, 4, 8)` channels and strides
    (1, 2, 2, 2); where the shape changes, the shortcut is a 1x1 stride-s
    convolution plus BN. Then global average pooling and a linear layer.

    The stem is one 3x3 stride-1 convolution with BN-ReLU and no max-pool. The
    ImageNet stem (7x7 stride-2 convolution and a stride-2 max-pool) would shrink
    Animal-10N's 64x64 images to 16x16 before the first block and to 2x2 at the
    last stage; this stem keeps 64x64 and ends at 8x8. The paper does not say
    which stem it used.

    Convolutions have no bias; BatchNorm uses PyTorch's defaults (momentum 0.9 in
    Keras' convention, epsilon 1e-5). About 21.28 M trainable parameters for 10
    classes at the default width.

    Args:
        input_shape: `(H, W, C)`, e.g. `(64, 64, 3)`.
        num_classes: number of output logits K.
        mean, std: per-channel normalisation in the 0-255 pixel scale.
        width: channels of the stem and the first stage (the reference: 64).
        name: model name.

    Returns:
        A functional `keras.Model` mapping images to `[N, K]` logits.

    Reference:
        He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition",
        CVPR 2016 (arXiv:1512.03385).
    """
    _check_width(width)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _normalisation(mean, std)(inputs)
    x = _conv3x3(x, width, 1, "stem_conv")
    x = _batch_norm(x, "stem_bn")
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = _stages(x, _basic_block, (3, 4, 6, 3), width)
    return keras.Model(inputs, _head(x, num_classes), name=name)


def resnet50(input_shape, num_classes, mean, std, weights=None, name="resnet50"):
    """ResNet-50 (`keras.applications`): the paper's Clothing1M backbone.

    `keras.applications.ResNet50` without its top, global average pooled, nested
    as one layer named `resnet50_features`, then a linear layer with K outputs.
    It keeps Keras' own layers (convolutions with bias, BatchNorm epsilon 1.001e-5,
    momentum 0.99). 23.53 M trainable parameters plus the head's 2049 K.

    With pretrained weights the input is preprocessed as those weights expect,
    inside the model (`CaffePreprocessing`), and `mean`, `std` are unused; without,
    it is normalised with `mean`, `std` like every other backbone.

    Args:
        input_shape: `(H, W, C)`, at least 32x32; C = 3 with pretrained weights.
        num_classes: number of output logits K.
        mean, std: per-channel normalisation in the 0-255 pixel scale.
        weights: `None` (random initialisation), `"imagenet"` (downloads Keras'
            ImageNet weights) or the path of a weights file for the top-less
            `keras.applications.ResNet50` (Keras' ImageNet file, for machines
            offline), which also gets the ImageNet preprocessing.
        name: model name.

    Returns:
        A functional `keras.Model` mapping images to `[N, K]` logits.

    Reference:
        He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition",
        CVPR 2016 (arXiv:1512.03385).
    """
    if weights is not None and weights != "imagenet":
        if not isinstance(weights, (str, os.PathLike)) or not os.path.isfile(weights):
            raise ValueError(
                f"weights={weights!r} must be None, 'imagenet' or the path of an "
                "existing weights file."
            )
        weights = os.fspath(weights)
    if weights is not None and tuple(input_shape)[-1] != 3:
        raise ValueError(
            f"input_shape={tuple(input_shape)}: pretrained ResNet-50 weights need "
            "3 (RGB) channels."
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if weights is None:
        x = _normalisation(mean, std)(inputs)
    else:
        x = CaffePreprocessing(name="caffe_preprocessing")(inputs)
    features = keras.applications.ResNet50(
        include_top=False,
        weights=weights,
        input_shape=tuple(input_shape),
        pooling="avg",
        name="resnet50_features",
    )
    x = features(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def build_backbone(
    kind,
    input_shape,
    num_classes,
    mean,
    std,
    *,
    width=None,
    hidden_units=0,
    weights=None,
    name=None,
):
    """Builds the backbone `kind`, one of `BACKBONES`.

    Args:
        kind: `"small_cnn"`, `"preact_resnet18"`, `"resnet34"` or `"resnet50"`.
        input_shape: `(H, W, C)`.
        num_classes: number of output logits K.
        mean, std: per-channel normalisation in the 0-255 pixel scale.
        width: base width; `None` takes the backbone's default (small_cnn 32,
            the ResNets 64). Not for `resnet50`.
        hidden_units: `small_cnn` only (see there).
        weights: `resnet50` only (see there).
        name: model name; `None` takes the factory's default.

    Returns:
        A functional `keras.Model` mapping images to `[N, K]` logits.

    Raises:
        ValueError: for an unknown `kind` or an argument that `kind` does not take.
    """
    if kind not in BACKBONES:
        raise ValueError(f"Unknown backbone kind={kind!r}; choose one of {BACKBONES}.")
    if hidden_units and kind != "small_cnn":
        raise ValueError(
            f"hidden_units={hidden_units!r} applies to small_cnn only, not {kind}."
        )
    if weights is not None and kind != "resnet50":
        raise ValueError(f"weights={weights!r} applies to resnet50 only, not {kind}.")
    if width is not None and kind == "resnet50":
        raise ValueError(f"width={width!r} does not apply to resnet50.")
    args = (input_shape, num_classes, mean, std)
    named = {} if name is None else {"name": name}
    if kind == "resnet50":
        return resnet50(*args, weights=weights, **named)
    width = _DEFAULT_WIDTH[kind] if width is None else width
    if kind == "small_cnn":
        return small_cnn(*args, width=width, hidden_units=hidden_units, **named)
    factory = {"preact_resnet18": preact_resnet18, "resnet34": resnet34}[kind]
    return factory(*args, width=width, **named)


def synchronize_batchnorm(model):
    """A copy of `model`, with the same weights, whose BatchNormalization layers
    average their batch statistics over all replicas (`synchronized=True`)
    instead of each replica normalising by its own share of the batch.

    Nested models (ResNet-50's `keras.applications` body) are converted too.
    Build it inside the strategy's scope, like the model it copies.
    """

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            config = {**layer.get_config(), "synchronized": True}
            return keras.layers.BatchNormalization.from_config(config)
        if isinstance(layer, keras.Model):
            return synchronize_batchnorm(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy
