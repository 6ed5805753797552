"""`folder:PATH` datasets built in a temp dir, with and without a CSV."""

import numpy as np
import pytest
import tensorflow as tf

from galkeras.datasets import DatasetError, load_dataset

CLASSES = ("cat", "dog", "fox")


def _write(path, value, size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((*size, 3), value, np.uint8)
    path.write_bytes(tf.io.encode_png(image).numpy())


def _tree(root, split_layout=True, per_class=4):
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            if split_layout:
                _write(root / "train" / name / f"{i}.png", 10 * c)
                _write(root / "test" / name / f"{i}.png", 10 * c)
            else:
                _write(root / name / f"{i}.png", 10 * c)
    return root


def test_train_test_layout(tmp_path):
    data = load_dataset(f"folder:{_tree(tmp_path / 'pets')}")
    assert data.name == "pets" and data.class_names == CLASSES
    assert data.x_train.shape == (12, 10, 12, 3) and data.x_test.shape == (
        12,
        10,
        12,
        3,
    )
    # Each image's pixel value encodes its class: labels follow the folders.
    np.testing.assert_array_equal(data.x_train[:, 0, 0, 0] // 10, data.y_train)
    np.testing.assert_array_equal(np.bincount(data.y_test), [4, 4, 4])


def test_flat_layout_with_validation_split_and_resize(tmp_path):
    root = _tree(tmp_path / "flat", split_layout=False, per_class=5)
    data = load_dataset(f"folder:{root}", validation_split=0.4, image_size=(6, 6))
    np.testing.assert_array_equal(np.bincount(data.y_test), [2, 2, 2])
    np.testing.assert_array_equal(np.bincount(data.y_train), [3, 3, 3])
    assert data.x_train.shape[1:] == (6, 6, 3)
    np.testing.assert_array_equal(data.x_train[:, 0, 0, 0] // 10, data.y_train)


def test_csv_labels_override_folders(tmp_path):
    root = _tree(tmp_path / "pets")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ntrain/cat/0.png,dog\ntrain/cat/1.png,2\n")
    data = load_dataset(f"folder:{root}", labels_csv=str(csv))
    by_value = data.y_train[data.x_train[:, 0, 0, 0] == 0]
    assert sorted(by_value.tolist()) == [0, 0, 1, 2]


@pytest.mark.parametrize(
    "line,message",
    [
        ("train/cat/0.png,dog,extra", "expected 2 columns"),
        ("train/cat/0.png;dog", "Separate the path and the label with a comma"),
        ("train/cat/0.png,wolf", "neither a class name"),
        ("train/cat/0.png,7", "outside [0, 3)"),
        ("../outside.png,0", "leaves the dataset root"),
        ("/etc/passwd,0", "leaves the dataset root"),
    ],
)
def test_bad_csv_lines_name_file_and_line(tmp_path, line, message):
    root = _tree(tmp_path / "pets")
    csv = tmp_path / "labels.csv"
    csv.write_text(f"train/dog/0.png,cat\n{line}\n")
    with pytest.raises(DatasetError) as error:
        load_dataset(f"folder:{root}", labels_csv=str(csv))
    assert f"{csv}, line 2" in str(error.value) and message in str(error.value)


def test_duplicate_csv_key(tmp_path):
    root = _tree(tmp_path / "pets")
    csv = tmp_path / "labels.csv"
    csv.write_text("train/dog/0.png,cat\ntrain/dog/0.png,fox\n")
    with pytest.raises(DatasetError, match="line 2: 'train/dog/0.png' is listed twice"):
        load_dataset(f"folder:{root}", labels_csv=str(csv))


def test_corrupt_image_fails_naming_it_or_is_skipped_and_counted(tmp_path):
    root = _tree(tmp_path / "pets")
    bad = root / "train" / "dog" / "9.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="9.png"):
        load_dataset(f"folder:{root}")
    data = load_dataset(f"folder:{root}", skip_corrupt_images=True)
    assert data.skipped_images == 1 and len(data.x_train) == 12


def test_empty_class_and_missing_root(tmp_path):
    root = _tree(tmp_path / "pets")
    (root / "train" / "owl").mkdir()
    (root / "test" / "owl").mkdir()
    with pytest.raises(DatasetError, match="class 'owl' has no images"):
        load_dataset(f"folder:{root}")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")


def test_csv_path_that_is_not_a_training_image(tmp_path):
    root = _tree(tmp_path / "pets")
    csv = tmp_path / "labels.csv"
    csv.write_text("train/dog/77.png,cat\n")
    with pytest.raises(DatasetError, match="not training images"):
        load_dataset(f"folder:{root}", labels_csv=str(csv))


def test_symlinks_leaving_the_root_are_refused_like_csv_paths(tmp_path):
    root = _tree(tmp_path / "pets")
    _write(tmp_path / "elsewhere" / "owl" / "0.png", 99)
    link = root / "train" / "cat" / "link.png"
    # A link that stays inside the root is followed, as in the labels CSV.
    link.symlink_to(root / "test" / "dog" / "0.png")
    assert len(load_dataset(f"folder:{root}").x_train) == 13
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere" / "owl" / "0.png")
    with pytest.raises(DatasetError) as error:
        load_dataset(f"folder:{root}")
    assert f"{link} is a link to {tmp_path / 'elsewhere' / 'owl' / '0.png'}" in str(
        error.value
    ) and "outside the dataset root" in str(error.value)
    link.unlink()
    owl = root / "train" / "owl"
    owl.symlink_to(tmp_path / "elsewhere" / "owl", target_is_directory=True)
    with pytest.raises(DatasetError, match=f"{owl} is a link to .*outside"):
        load_dataset(f"folder:{root}")


def test_csv_with_excel_byte_order_mark(tmp_path):
    root = _tree(tmp_path / "pets")
    csv = tmp_path / "labels.csv"
    # Excel's "CSV UTF-8" starts the file with a byte order mark.
    csv.write_text("path,label\ntrain/cat/0.png,dog\n", encoding="utf-8-sig")
    data = load_dataset(f"folder:{root}", labels_csv=str(csv))
    assert sorted(data.y_train[data.x_train[:, 0, 0, 0] == 0].tolist()) == [0, 0, 0, 1]


def test_unreadable_csv_names_the_file(tmp_path):
    root = _tree(tmp_path / "pets")
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("train/cat/caf\xe9.png,dog\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=f"{csv}, line 1: not UTF-8.*CSV UTF-8"):
        load_dataset(f"folder:{root}", labels_csv=str(csv))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'absent.csv'}.*not exist"):
        load_dataset(f"folder:{root}", labels_csv=str(tmp_path / "absent.csv"))
