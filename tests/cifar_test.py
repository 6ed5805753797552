"""CIFAR-10/100 and CIFAR-10N/100N through TFDS, on `tfds.testing.mock_data`."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from galkeras import train
from galkeras.datasets import DatasetError, load_dataset
from galkeras.datasets.cifar import _MANUAL_NEEDS


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_through_tfds_with_synthetic_noise(name, k):
    with tfds.testing.mock_data(num_examples=40):
        data = load_dataset(name)
    assert data.x_train.shape == (40, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.num_classes == k and len(data.class_names) == k
    assert data.augmentation == "crop_flip"
    config = train.TrainConfig(dataset=name, noise_type="sym", noise_rate=0.5)
    noisy, clean = train.training_labels(data, config)
    np.testing.assert_array_equal(clean, data.y_train_clean)
    assert (noisy != clean).any()


def _manual_dir(tmp_path, tfds_name):
    """A TFDS data_dir whose manual directory holds the files the builder needs."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in _MANUAL_NEEDS[tfds_name]:
        (manual / name).write_bytes(b"")
    return str(tmp_path)


def test_cifar10n_label_sets_and_clean_bookkeeping(tmp_path):
    data_dir = _manual_dir(tmp_path, "cifar10_n")
    with tfds.testing.mock_data(num_examples=30):
        data = load_dataset("cifar10n", data_dir=data_dir)
    assert set(data.noisy_label_sets) == {
        "aggre",
        "worse",
        "random1",
        "random2",
        "random3",
    }
    for noise_type in data.noisy_label_sets:
        config = train.TrainConfig(dataset="cifar10n", noise_type=noise_type)
        noisy, clean = train.training_labels(data, config)
        np.testing.assert_array_equal(noisy, data.noisy_label_sets[noise_type])
        np.testing.assert_array_equal(clean, data.y_train_clean)
    with pytest.raises(DatasetError, match="--noise_type=noisy"):
        train.training_labels(data, train.TrainConfig(noise_type="noisy"))


def test_cifar100n_noisy_set(tmp_path):
    data_dir = _manual_dir(tmp_path, "cifar100_n")
    with tfds.testing.mock_data(num_examples=20):
        data = load_dataset("cifar100n", data_dir=data_dir)
    assert list(data.noisy_label_sets) == ["noisy"] and data.num_classes == 100


def test_missing_manual_download_names_the_files(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10n", data_dir=str(tmp_path))
    message = str(error.value)
    assert "cifar10n" in message and "side_info_cifar10N.csv" in message
    assert "downloads/manual" in message and "image_order_c10.npy" in message
