"""load_dataset on every format a user can give, each written tiny by the test itself."""
from __future__ import annotations

import gzip
import io
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from optimization.base import InvalidInputError, UnsafeModelError
from optimization.datasets import load_dataset, write_digits_preset


def write_idx(path, array: np.ndarray, compress=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def image_folder_zip(path, classes=("cat", "dog"), per_class=6, size=(6, 5), mode="RGB", wrapper="photos/"):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for label, name in enumerate(classes):
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = np.full(shape, 40 + 160 * label, dtype=np.uint8) + rng.integers(0, 20, shape, dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels, mode).save(buffer, format="PNG" if i % 2 else "JPEG")
                archive.writestr(f"{wrapper}{name}/{i}.{'png' if i % 2 else 'jpg'}", buffer.getvalue())
    return path


def test_npz_with_train_and_test_arrays_is_used_as_given(tmp_path):
    x_train = np.random.default_rng(0).random((20, 2, 4, 4), dtype=np.float32)
    x_test = np.ones((5, 2, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=np.arange(20) % 3, x_test=x_test, y_test=np.arange(5) % 3)
    dataset = load_dataset(tmp_path / "d.npz", "mine", "NCHW")
    assert dataset.input_shape == (2, 4, 4)  # not transposed: already in the model's layout
    assert len(dataset.x_train) == 20 and len(dataset.x_test) == 5
    assert np.array_equal(dataset.x_test, x_test)
    assert dataset.num_classes == 3


def test_npz_with_x_and_y_is_split_into_train_calibration_and_test(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((50, 8, 8, 1), np.float32), y=np.arange(50) % 5)
    dataset = load_dataset(tmp_path / "d.npz", "mine", "NHWC")
    assert dataset.input_shape == (8, 8, 1)
    assert len(dataset.x_train) + len(dataset.x_test) == 50
    assert len(dataset.x_calib) > 0 and dataset.num_classes == 5


def test_npz_holding_python_objects_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(InvalidInputError, match="not Python objects"):
        load_dataset(tmp_path / "d.npz", "mine", "NCHW")


def test_npz_with_wrong_keys_says_which_keys_it_needs(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 2)), labels=np.zeros(3, int))
    with pytest.raises(InvalidInputError, match="x_train y_train x_test y_test, or x y"):
        load_dataset(tmp_path / "d.npz", "mine", "NCHW")


def test_image_folder_zip_becomes_labelled_images_in_the_model_layout(tmp_path):
    archive = image_folder_zip(tmp_path / "pets.zip")
    dataset = load_dataset(archive, "pets", "NCHW", {"resize": [4, 4]})
    assert dataset.input_shape == (3, 4, 4)
    assert dataset.num_classes == 2
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    labels = np.concatenate([dataset.y_train, dataset.y_test])
    means = np.concatenate([dataset.x_train, dataset.x_test]).mean(axis=(1, 2, 3))
    assert means[labels == 1].min() > means[labels == 0].max()  # dog images are the brighter class


def test_image_folder_with_mixed_sizes_asks_for_resize(tmp_path):
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, size in (("a/1.png", (4, 4)), ("b/1.png", (5, 5))):
            buffer = io.BytesIO()
            Image.new("L", size).save(buffer, format="PNG")
            handle.writestr(name, buffer.getvalue())
    with pytest.raises(InvalidInputError, match="resize"):
        load_dataset(archive, "mixed", "NHWC")


def test_image_folder_zip_with_path_traversal_is_refused(tmp_path):
    archive = image_folder_zip(tmp_path / "evil.zip", wrapper="../")
    with pytest.raises(UnsafeModelError, match="outside"):
        load_dataset(archive, "evil", "NCHW")


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_load_with_their_own_test_split(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (30, 6, 6)), compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(30) % 10, compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", np.full((7, 6, 6), 255), compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(7) % 10, compress)
    dataset = load_dataset(tmp_path, "mnist", "NCHW")
    assert dataset.input_shape == (1, 6, 6)
    assert len(dataset.x_test) == 7 and np.allclose(dataset.x_test, 1.0)
    assert len(dataset.x_train) == 30


def test_truncated_idx_file_is_reported(tmp_path):
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        write_idx(tmp_path / stem, np.zeros((3, 4, 4)))
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        write_idx(tmp_path / stem, np.zeros(3))
    (tmp_path / "train-images-idx3-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(InvalidInputError, match="truncated"):
        load_dataset(tmp_path, "mnist", "NCHW")


def test_cifar10_binary_batches_load_as_rgb_with_preprocessing(tmp_path):
    def batch(n, label_offset):
        labels = (np.arange(n) + label_offset) % 10
        images = np.zeros((n, 3, 32, 32), np.uint8)
        images[:, 0] = 255  # red plane full: channel order must survive the CHW -> HWC reading
        return np.concatenate([labels[:, None].astype(np.uint8), images.reshape(n, -1)], axis=1).tobytes()

    (tmp_path / "data_batch_1.bin").write_bytes(batch(12, 0))
    (tmp_path / "data_batch_2.bin").write_bytes(batch(8, 3))
    (tmp_path / "test_batch.bin").write_bytes(batch(5, 0))
    dataset = load_dataset(tmp_path, "cifar10", "NHWC", {"resize": [16, 16],
                                                         "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    assert dataset.input_shape == (16, 16, 3)
    assert len(dataset.x_train) == 20 and len(dataset.x_test) == 5
    assert np.allclose(dataset.x_test[..., 0], 1.0) and np.allclose(dataset.x_test[..., 1], -1.0)


def test_digits_preset_can_be_upscaled_to_three_channels(tmp_path):
    write_digits_preset(tmp_path)
    dataset = load_dataset(tmp_path, "digits", "NCHW", {"resize": [16, 16], "channels": 3})
    assert dataset.input_shape == (3, 16, 16)
    assert np.allclose(dataset.x_train[:, 0], dataset.x_train[:, 2])


def test_unknown_directory_and_file_types_are_explained(tmp_path):
    with pytest.raises(InvalidInputError, match="MNIST|CIFAR"):
        load_dataset(tmp_path, "nothing", "NCHW")
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(InvalidInputError, match=".npz"):
        load_dataset(tmp_path / "data.csv", "csv", "NCHW")
