import numpy as np
import pytest
from sklearn.datasets import load_digits

from galkeras import datasets
from galkeras.datasets import Dataset, DatasetError, base

# --- digits ---


@pytest.fixture(scope="module")
def digits():
    return datasets.load_dataset("digits")


def test_digits_shapes_and_dtypes(digits):
    assert digits.name == "digits"
    assert digits.num_train + len(digits.x_test) == 1797
    assert digits.image_shape == (8, 8, 1)
    assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
    assert digits.y_train.dtype == np.int64 and digits.y_test.dtype == np.int64
    assert digits.num_classes == 10
    assert digits.class_names == tuple("0123456789")
    np.testing.assert_array_equal(digits.y_train_clean, digits.y_train)
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0


def test_digits_split_is_stratified_partition(digits):
    reference = load_digits()
    class_counts = np.bincount(reference.target, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(digits.y_test, minlength=10), np.round(0.2 * class_counts)
    )
    np.testing.assert_array_equal(
        np.bincount(digits.y_train, minlength=10),
        class_counts - np.round(0.2 * class_counts),
    )
    # Train and test together are exactly the 1797 images, rescaled 0..16 -> 0..255.
    rescaled = np.round(reference.images * 255 / 16).astype(np.uint8)
    expected = [
        (image.tobytes(), int(label))
        for image, label in zip(rescaled, reference.target)
    ]
    got = [
        (image[..., 0].tobytes(), int(label))
        for images, labels in [
            (digits.x_train, digits.y_train),
            (digits.x_test, digits.y_test),
        ]
        for image, label in zip(images, labels)
    ]
    assert sorted(got) == sorted(expected)


def test_digits_mean_std_from_training_images(digits):
    pixels = digits.x_train.astype(np.float64)
    assert digits.mean == pytest.approx((pixels.mean(),))
    assert digits.std == pytest.approx((pixels.std(),))


def test_digits_deterministic(digits):
    again = datasets.load_dataset("digits")
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)


# --- Registry ---


def test_dataset_names():
    names = datasets.dataset_names()
    assert "digits" in names and "npz:PATH" in names


def test_check_dataset_spec_unknown_lists_names():
    with pytest.raises(DatasetError, match="nope") as info:
        datasets.check_dataset_spec("nope")
    assert "digits" in str(info.value) and "npz:PATH" in str(info.value)


@pytest.mark.parametrize("spec", ["npz", "npz:", "digits:extra"])
def test_check_dataset_spec_argument_errors(spec):
    with pytest.raises(DatasetError, match="npz|digits"):
        datasets.check_dataset_spec(spec)


def test_check_dataset_spec_accepts_known_without_loading(tmp_path):
    datasets.check_dataset_spec("digits")
    # No file is read: a path that does not exist still passes.
    datasets.check_dataset_spec(f"npz:{tmp_path / 'missing.npz'}")


def test_register_custom_loader(monkeypatch):
    # Register into a copy, so the test loader does not leak into other tests.
    monkeypatch.setattr(base, "_LOADERS", dict(base._LOADERS))
    calls = []

    @datasets.register("tiny_for_test", prefix=True)
    def load_tiny(arg, data_dir, **options):
        calls.append((arg, data_dir))
        return tiny_dataset(name=f"tiny_{arg}")

    assert datasets.load_dataset("tiny_for_test:a", data_dir="/d").name == "tiny_a"
    assert calls == [("a", "/d")]
    assert "tiny_for_test:PATH" in datasets.dataset_names()
    with pytest.raises(ValueError, match="already registered"):
        datasets.register("tiny_for_test")(lambda arg, data_dir: None)


# --- Dataset validation ---


def tiny_dataset(**overrides):
    rng = np.random.default_rng(0)
    fields = dict(
        name="tiny",
        x_train=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8),
        y_train=np.array([0, 1, 2, 0, 1, 2]),
        x_test=rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8),
        y_test=np.array([2, 1, 0]),
        num_classes=3,
        class_names=("a", "b", "c"),
    )
    fields.update(overrides)
    return Dataset(**fields)


def test_dataset_defaults_and_conversions():
    dataset = tiny_dataset(
        x_train=np.zeros((6, 4, 4), np.uint8),
        x_test=np.full((3, 4, 4), 255, np.uint8),
        y_train=np.array([[0], [1], [2], [0], [1], [2]], dtype=np.int32),
    )
    assert dataset.image_shape == (4, 4, 1)
    assert dataset.y_train.shape == (6,) and dataset.y_train.dtype == np.int64
    assert dataset.y_train_clean is None
    # A constant channel gets std 1 so normalising stays finite.
    assert dataset.mean == (0.0,) and dataset.std == (1.0,)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"x_train": np.zeros((6, 4, 4, 3), np.float32)}, "x_train.*uint8"),
        ({"x_test": np.zeros((3, 4), np.uint8)}, r"x_test.*\(N, H, W"),
        ({"x_test": np.zeros((3, 5, 4, 3), np.uint8)}, "x_test"),
        ({"y_train": np.array([0, 1, 2])}, "y_train has 3 labels.*x_train has 6"),
        ({"y_test": np.array([0.0, 1.0, 2.0])}, "y_test.*integer"),
        ({"y_test": np.array([0, 1, 3])}, r"y_test has label 3 outside \[0, 3\)"),
        ({"y_train_clean": np.array([0, 1])}, "y_train_clean"),
        ({"class_names": ("a", "b")}, "class_names"),
        ({"num_classes": 1, "class_names": ("a",)}, "num_classes"),
        ({"mean": (1.0,)}, "mean has 1 values"),
        ({"class_names": ("a", "b", "a")}, "duplicate class name 'a'"),
        ({"class_names": (1, "1", "c")}, "duplicate class name '1'"),
        ({"x_train": np.zeros((6, 4, 4, 0), np.uint8)}, r"x_train.*\(6, 4, 4, 0\)"),
        ({"x_test": np.zeros((3, 0, 4, 3), np.uint8)}, r"x_test.*\(3, 0, 4, 3\)"),
    ],
)
def test_dataset_validation(overrides, message):
    with pytest.raises(DatasetError, match=message):
        tiny_dataset(**overrides)


def test_dataset_is_frozen():
    dataset = tiny_dataset()
    with pytest.raises(AttributeError):
        dataset.name = "other"


# --- npz ---


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def npz_arrays(channels=True):
    rng = np.random.default_rng(1)
    shape = (5, 6, 6, 3) if channels else (5, 6, 6)
    return dict(
        x_train=rng.integers(0, 256, shape, dtype=np.uint8),
        y_train=np.array([0, 1, 2, 1, 0]),
        x_test=rng.integers(0, 256, (2,) + shape[1:], dtype=np.uint8),
        y_test=np.array([2, 2]),
    )


@pytest.mark.parametrize("channels", [True, False])
def test_npz_round_trip(tmp_path, channels):
    arrays = npz_arrays(channels)
    path = write_npz(tmp_path / "mine.npz", **arrays)
    dataset = datasets.load_dataset(f"npz:{path}")
    assert dataset.name == "mine"
    x_train = arrays["x_train"] if channels else arrays["x_train"][..., None]
    np.testing.assert_array_equal(dataset.x_train, x_train)
    np.testing.assert_array_equal(dataset.y_train, arrays["y_train"])
    np.testing.assert_array_equal(dataset.y_test, arrays["y_test"])
    assert dataset.image_shape == x_train.shape[1:]
    assert dataset.num_classes == 3
    assert dataset.class_names == ("0", "1", "2")
    assert dataset.y_train_clean is None
    pixels = x_train.reshape(-1, x_train.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(dataset.mean, pixels.mean(axis=0))
    np.testing.assert_allclose(dataset.std, pixels.std(axis=0))


def test_npz_with_clean_labels_and_class_names(tmp_path, caplog):
    arrays = npz_arrays()
    clean = np.array([0, 1, 2, 2, 0])
    path = write_npz(
        tmp_path / "named.npz",
        **arrays,
        y_train_clean=clean,
        class_names=np.array(["cat", "dog", "emu", "fox"]),
    )
    dataset = datasets.load_dataset(f"npz:{path}")
    # class_names fixes K, even above the largest label.
    assert dataset.num_classes == 4
    assert dataset.class_names == ("cat", "dog", "emu", "fox")
    np.testing.assert_array_equal(dataset.y_train_clean, clean)
    # "fox" has no training image: it is declared, so allowed, with a warning.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "named.npz" in warnings[0] and "3 ('fox')" in warnings[0]


def test_npz_unsigned_labels(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.uint64)
    dataset = datasets.load_dataset(f"npz:{write_npz(tmp_path / 'u.npz', **arrays)}")
    assert dataset.num_classes == 3 and dataset.y_train.dtype == np.int64
    np.testing.assert_array_equal(dataset.y_train, [0, 1, 2, 1, 0])


def test_npz_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(DatasetError, match="absent.npz.*does not exist"):
        datasets.load_dataset(f"npz:{path}")


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(DatasetError, match="text.npz.*not a valid .npz"):
        datasets.load_dataset(f"npz:{path}")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DatasetError, match="single.npy.*not a valid .npz"):
        datasets.load_dataset(f"npz:{tmp_path / 'single.npy'}")


def test_npz_object_array_refused(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = np.array([0, 1, 2, 1, None], dtype=object)
    path = write_npz(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(DatasetError, match="y_train.*pickle"):
        datasets.load_dataset(f"npz:{path}")


def test_npz_missing_key(tmp_path):
    arrays = npz_arrays()
    del arrays["y_test"]
    path = write_npz(tmp_path / "partial.npz", **arrays)
    with pytest.raises(DatasetError, match="partial.npz.*'y_test'") as info:
        datasets.load_dataset(f"npz:{path}")
    assert "x_train, y_train, x_test, y_test" in str(info.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"y_train": np.array([0, 1, 2])}, "y_train has 3 labels.*x_train has 5"),
        ({"y_train_clean": np.array([0, 1])}, "y_train_clean has 2 labels"),
        ({"x_train": np.zeros((5, 6, 6, 3), np.float32)}, "x_train.*uint8"),
        ({"x_test": np.zeros((2, 6), np.uint8)}, r"x_test.*\(N, H, W"),
        ({"x_test": np.zeros((2, 7, 7, 3), np.uint8)}, "x_train.*x_test"),
        ({"y_test": np.array([1.0, 2.0])}, "y_test.*integer"),
        ({"y_test": np.array([-1, 2])}, r"y_test\[0\] = -1 is a negative label"),
        (
            {"class_names": np.array(["a", "b"])},
            r"y_train has label 2 outside \[0, 2\)",
        ),
        ({"class_names": np.array([1, 2, 3])}, "class_names.*string"),
        # Without class_names, K = the largest label + 1 and every class in
        # [0, K) needs a training image: one stray label cannot set K.
        (
            {"y_train": np.array([0, 1, 2, 1, 10**6])},
            r"largest label \+ 1 = 1000001 \(y_train\[4\] = 1000000\).*"
            r"classes 3, 4, 5, 6, 7, \.\.\. \(999997 in all\) have no training "
            r"image.*Relabel.*add a class_names array",
        ),
        (
            {"y_train": np.array([0, 1, 3, 1, 0]), "y_test": np.array([3, 3])},
            r"class 2 has no training image",
        ),
        ({"y_test": np.array([3, 2])}, r"y_test\[0\] = 3.*class 3 has no"),
        (
            {"y_train_clean": np.array([0, 1, 4, 1, 0])},
            r"y_train_clean\[2\] = 4.*classes 3, 4 have no",
        ),
        # Labels are checked before K is inferred, naming the key and the index.
        ({"y_train": np.array([0, 1, 2, 1, -7])}, r"y_train\[4\] = -7.*negative"),
        (
            {"y_train": np.array([0, 1, 2, 1, 2**64 - 1], np.uint64)},
            r"y_train\[4\] = 18446744073709551615",
        ),
        (
            {"y_test": np.array([0, 3]), "class_names": np.array(["a", "b", "c"])},
            r"y_test has label 3 outside \[0, 3\) \(y_test\[1\]\).*class_names",
        ),
        # class_names may declare classes without training images, but not more
        # classes than there are training images.
        (
            {"class_names": np.array(list("abcdef"))},
            "class_names declares 6 classes but there are 5 training images",
        ),
        (
            {"class_names": np.array(["a", "b", "a"])},
            "duplicate class name 'a'",
        ),
        (
            {"class_names": np.array([b"cat", b"\xffdog", b"emu"])},
            r"class_names\[1\] is not UTF-8.*np.array\(names, dtype=str\)",
        ),
        (
            {"x_train": np.zeros((5, 6, 6, 0), np.uint8)},
            r"x_train.*\(5, 6, 6, 0\).*at least 1",
        ),
        (
            {
                "x_train": np.zeros((5, 0, 6), np.uint8),
                "x_test": np.zeros((2, 0, 6), np.uint8),
            },
            r"x_train.*\(5, 0, 6\).*at least 1",
        ),
    ],
)
def test_npz_bad_contents(tmp_path, changes, message):
    arrays = npz_arrays()
    arrays.update(changes)
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message) as info:
        datasets.load_dataset(f"npz:{path}")
    assert "bad.npz" in str(info.value)
