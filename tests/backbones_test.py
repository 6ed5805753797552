"""Backbones: exact parameter counts against hand formulas, shapes, names,
normalisation, serialisation and argument checks."""

import keras
import numpy as np
import pytest

from galkeras import backbones

MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)

# keras.applications.ResNet50(include_top=False): all weights, and the trainable
# ones (all less the BatchNorm moving means and variances, 53,120).
RESNET50_NO_TOP_PARAMS = 23_587_712
RESNET50_NO_TOP_TRAINABLE = 23_534_592

# Small widths for the tests that do not count parameters.
SMALL = {"small_cnn": 4, "preact_resnet18": 2, "resnet34": 2, "resnet50": None}


def trainable_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def stage_widths(width, depths):
    """(in, out) channels of every block of four stages of `width * 2**s`."""
    pairs, channels = [], width
    for stage, depth in enumerate(depths):
        for _ in range(depth):
            pairs.append((channels, width * 2**stage))
            channels = width * 2**stage
    return pairs


def preact_resnet18_params(in_channels, width, num_classes):
    """kuangliu's PreActResNet18: stem conv; per block bn1(i), conv1, bn2(o), conv2
    and a BN-less 1x1 shortcut where i != o; linear head."""
    count = 9 * in_channels * width
    for i, o in stage_widths(width, (2, 2, 2, 2)):
        count += 2 * i + 9 * i * o + 2 * o + 9 * o * o + (i * o if i != o else 0)
    return count + 8 * width * num_classes + num_classes


def resnet34_params(in_channels, width, num_classes):
    """Stem conv + BN; per block conv1, bn1, conv2, bn2 and a 1x1 conv + BN
    shortcut where i != o; linear head."""
    count = 9 * in_channels * width + 2 * width
    for i, o in stage_widths(width, (3, 4, 6, 3)):
        count += 9 * i * o + 2 * o + 9 * o * o + 2 * o
        count += i * o + 2 * o if i != o else 0
    return count + 8 * width * num_classes + num_classes


def images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3))


def check_normalisation(layer):
    pixels = np.array([[[MEAN, np.add(MEAN, STD)]]], dtype="float32")
    np.testing.assert_allclose(layer(pixels)[0, 0], [[0, 0, 0], [1, 1, 1]], atol=1e-6)


@pytest.fixture(scope="module")
def resnet50_14():
    return backbones.resnet50((64, 64, 3), 14, MEAN, STD)


def test_hand_formulas_match_the_references():
    # kuangliu/pytorch-cifar's PreActResNet18 and a 3x3-stem ResNet-34 (torchvision's
    # 21,797,672 less its 7x7 stem, less the 1000-way head, plus these).
    assert preact_resnet18_params(3, 64, 10) == 11_171_146
    assert resnet34_params(3, 64, 10) == 21_797_672 - 9408 - 513_000 + 1728 + 5130


@pytest.mark.parametrize("num_classes", [10, 100])
def test_preact_resnet18(num_classes):
    model = backbones.preact_resnet18((32, 32, 3), num_classes, MEAN, STD)
    assert trainable_params(model) == preact_resnet18_params(3, 64, num_classes)
    # Global pooling of a 4x4 map: the reference's avg_pool2d(out, 4).
    assert tuple(model.get_layer("pool").input.shape) == (None, 4, 4, 512)
    logits = model(images(2, 32), training=False)
    assert tuple(logits.shape) == (2, num_classes)


def test_resnet34():
    model = backbones.resnet34((64, 64, 3), 10, MEAN, STD)
    assert trainable_params(model) == resnet34_params(3, 64, 10)
    assert tuple(model.get_layer("pool").input.shape) == (None, 8, 8, 512)
    assert tuple(model(images(2, 64), training=False).shape) == (2, 10)


def test_resnet50(resnet50_14):
    head = 2048 * 14 + 14
    assert resnet50_14.count_params() == RESNET50_NO_TOP_PARAMS + head
    assert trainable_params(resnet50_14) == RESNET50_NO_TOP_TRAINABLE + head
    assert tuple(resnet50_14(images(2, 64), training=False).shape) == (2, 14)


@pytest.mark.parametrize("kind", backbones.BACKBONES)
def test_two_models_side_by_side(kind):
    def build(name):
        return backbones.build_backbone(
            kind, (32, 32, 3), 3, MEAN, STD, width=SMALL[kind], name=name
        )

    twin_a, twin_b = build("twin_a"), build("twin_b")
    assert (twin_a.name, twin_b.name) == ("twin_a", "twin_b")
    for model in (twin_a, twin_b):
        assert [x.name for x in model.inputs] == ["image"]
        paths = [v.path for v in model.trainable_variables]
        assert len(set(paths)) == len(paths)
    assert [v.path for v in twin_a.weights] == [v.path for v in twin_b.weights]
    twin_b.set_weights(twin_a.get_weights())
    x = images(2, 32)
    np.testing.assert_array_equal(twin_a(x), twin_b(x))


@pytest.mark.parametrize("kind", backbones.BACKBONES)
def test_default_names_and_widths(kind):
    model = backbones.build_backbone(kind, (32, 32, 1), 3, [0.0], [1.0])
    assert model.name == kind
    if kind != "resnet50":
        first_conv = [v for v in model.trainable_variables if "kernel" in v.path][0]
        assert first_conv.shape[-1] == (32 if kind == "small_cnn" else 64)


@pytest.mark.parametrize("kind", ["small_cnn", "preact_resnet18", "resnet34"])
def test_normalisation_is_the_first_layer(kind):
    model = backbones.build_backbone(kind, (8, 8, 3), 3, MEAN, STD, width=SMALL[kind])
    check_normalisation(model.layers[1])


def test_resnet50_normalisation(resnet50_14):
    check_normalisation(resnet50_14.layers[1])


@pytest.mark.parametrize("kind", backbones.BACKBONES)
def test_logits_stay_float32_under_mixed_precision(kind):
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = backbones.build_backbone(
            kind, (32, 32, 3), 3, MEAN, STD, width=SMALL[kind]
        )
        assert model.layers[-2].compute_dtype == "bfloat16"
        assert keras.backend.standardize_dtype(model(images(2, 32)).dtype) == "float32"
    finally:
        keras.config.set_dtype_policy(policy)


def test_resnet50_keras_round_trip(resnet50_14, tmp_path):
    path = tmp_path / "resnet50.keras"
    resnet50_14.save(path)
    loaded = keras.models.load_model(path)
    x = images(2, 64)
    np.testing.assert_array_equal(resnet50_14.predict(x, verbose=0), loaded.predict(x))


def test_caffe_preprocessing_is_keras_preprocess_input():
    x = images(2, 4)
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    layer = backbones.CaffePreprocessing()
    np.testing.assert_allclose(layer(x.astype("float32")), expected, atol=1e-4)
    copy = backbones.CaffePreprocessing.from_config(layer.get_config())
    np.testing.assert_array_equal(copy(x.astype("float32")), layer(x))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        backbones.CaffePreprocessing()(np.zeros((1, 4, 4, 1)))


def test_resnet50_from_a_weights_file(tmp_path):
    """A weights file (the offline stand-in for 'imagenet') is loaded, brings the
    ImageNet preprocessing, and the saved model is self-contained."""
    features = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    weights = tmp_path / "notop.weights.h5"
    features.save_weights(weights)
    model = backbones.resnet50((32, 32, 3), 3, MEAN, STD, weights=weights)
    assert isinstance(model.layers[1], backbones.CaffePreprocessing)
    for expected, got in zip(
        features.weights, model.get_layer("resnet50_features").weights
    ):
        np.testing.assert_array_equal(expected, got)
    path = tmp_path / "resnet50.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], backbones.CaffePreprocessing)
    x = images(2, 32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x))


@pytest.mark.parametrize(
    "kind, kwargs, argument",
    [
        ("vgg99", {}, "kind='vgg99'.*preact_resnet18"),
        ("preact_resnet18", {"hidden_units": 8}, "hidden_units=8"),
        ("resnet34", {"weights": "imagenet"}, "weights='imagenet'"),
        ("resnet50", {"width": 8}, "width=8"),
        ("small_cnn", {"width": 0}, "width=0"),
        ("resnet34", {"width": 2.5}, "width=2.5"),
        ("resnet50", {"weights": "no/such/file.h5"}, "weights='no/such/file.h5'"),
        ("resnet50", {"weights": 3}, "weights=3"),
    ],
)
def test_bad_arguments(kind, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        backbones.build_backbone(kind, (32, 32, 3), 3, MEAN, STD, **kwargs)


def test_pretrained_resnet50_needs_rgb():
    # Refused before anything is downloaded.
    with pytest.raises(ValueError, match="input_shape=\\(32, 32, 1\\)"):
        backbones.resnet50((32, 32, 1), 3, [0.0], [1.0], weights="imagenet")
