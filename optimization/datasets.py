"""Datasets: the `digits` preset, uploaded files and standard formats, as numpy splits.

Every loader returns a `Dataset` whose arrays are float32 in the model's layout (NCHW for
PyTorch, NHWC for Keras) with deterministic train / calibration / test splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimization.catalog import IMAGE_SUFFIXES

LAYOUTS = ("NCHW", "NHWC")
DEFAULT_SPLIT_SEED = 0


@dataclass
class Dataset:
    name: str
    layout: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train": len(self.x_train),
            "calibration": len(self.x_calib),
            "test": len(self.x_test),
        }


def split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    layout: str,
    test_fraction: float = 0.2,
    calib_size: int = 128,
    seed: int = DEFAULT_SPLIT_SEED,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
) -> Dataset:
    """Deterministic split: a shuffled test part (unless given), then the calibration samples
    come from the training part (never from the test data)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    if x_test is None:
        n_test = max(1, int(round(len(x) * test_fraction)))
        x_test, y_test = x[:n_test], y[:n_test]
        x, y = x[n_test:], y[n_test:]
    else:
        x_test = np.asarray(x_test, dtype=np.float32)
        y_test = np.asarray(y_test).astype(np.int64).reshape(-1)
    calib = min(calib_size, len(x))
    num_classes = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        name=name,
        layout=layout,
        x_train=x,
        y_train=y,
        x_calib=x[:calib],
        y_calib=y[:calib],
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
    )


def to_layout(images_nhwc: np.ndarray, layout: str) -> np.ndarray:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return np.transpose(images_nhwc, (0, 3, 1, 2)) if layout == "NCHW" else images_nhwc


def write_digits_preset(preset_dir: Path) -> Path:
    """Write scikit-learn's 8x8 digits (bundled with the library, no download) as
    `digits.npz` with `x y` in NHWC, values scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    preset_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]  # (n, 8, 8, 1)
    path = preset_dir / "digits.npz"
    np.savez_compressed(path, x=x, y=digits.target.astype(np.int64))
    return path


def load_digits_preset(preset_dir: Path, layout: str) -> Dataset:
    path = preset_dir / "digits.npz"
    if not path.exists():
        write_digits_preset(preset_dir)
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    return split("digits", to_layout(x, layout), y, layout)


# --------------------------------------------------------------------------- standard formats and uploads

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the image as 3 planes of 32x32
MAX_IMAGEFOLDER_BYTES = 2 * 2**30


def load_dataset(path: Path, name: str, layout: str, preprocessing: dict | None = None) -> Dataset:
    """Load a preset directory (digits.npz, MNIST/Fashion-MNIST idx files, CIFAR-10 binary
    batches), an uploaded `.npz` (arrays already in the model's layout: used as they are,
    `preprocessing` does not apply) or an ImageFolder `.zip` (a folder per class, optionally
    inside `train/` and `test/`).

    Images from presets and ImageFolder are NHWC in [0, 1] and go through `preprocessing`
    (`{"resize": [H, W], "channels": 1 | 3, "normalize": {"mean": [...], "std": [...]}}`,
    applied in that order) and then into `layout`.
    """
    from optimization.base import InvalidInputError

    path = Path(path)
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if path.is_dir():
        return _load_preset_dir(path, name, layout, preprocessing or {})
    if not path.is_file():
        raise InvalidInputError(f"dataset {path.name} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, name, layout)
    if suffix == ".zip":
        return _load_image_folder_zip(path, name, layout, preprocessing or {})
    raise InvalidInputError(
        f"{path.name}: upload a .npz (x_train y_train x_test y_test, or x y) or a .zip of class folders of images"
    )


def preprocess(images_nhwc: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Resize (bilinear), set the channel count (gray <-> RGB) and normalise NHWC [0, 1] images."""
    from optimization.base import InvalidInputError

    images = np.asarray(images_nhwc, dtype=np.float32)
    unknown = set(preprocessing) - {"resize", "channels", "normalize"}
    if unknown:
        raise InvalidInputError(f"unknown preprocessing keys {sorted(unknown)}; use resize, channels, normalize")
    if preprocessing.get("resize"):
        images = _resize(images, tuple(int(v) for v in preprocessing["resize"]))
    channels = preprocessing.get("channels")
    if channels is not None:
        images = _set_channels(images, int(channels))
    normalize = preprocessing.get("normalize")
    if normalize:
        mean = np.asarray(normalize.get("mean", [0.0]), dtype=np.float32)
        std = np.asarray(normalize.get("std", [1.0]), dtype=np.float32)
        if mean.size not in (1, images.shape[-1]) or std.size not in (1, images.shape[-1]) or np.any(std == 0):
            raise InvalidInputError(
                f"normalize needs 1 or {images.shape[-1]} mean/std values, std non-zero; got {mean.tolist()}, {std.tolist()}"
            )
        images = (images - mean) / std
    return images.astype(np.float32)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if images.shape[1:3] == size:
        return images
    out = np.empty((len(images), size[0], size[1], images.shape[-1]), dtype=np.float32)
    for i, image in enumerate(images):
        for c in range(images.shape[-1]):
            plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
            out[i, ..., c] = np.asarray(plane.resize((size[1], size[0]), Image.BILINEAR))
    return out


def _set_channels(images: np.ndarray, channels: int) -> np.ndarray:
    from optimization.base import InvalidInputError

    current = images.shape[-1]
    if channels == current:
        return images
    if current == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if current == 3 and channels == 1:
        return (images @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32))[..., None]  # ITU-R 601 luma
    raise InvalidInputError(f"cannot turn {current}-channel images into {channels} channels; use 1 or 3")


def _finish_images(name, layout, preprocessing, x, y, x_test=None, y_test=None) -> Dataset:
    x = to_layout(preprocess(x, preprocessing), layout)
    if x_test is not None:
        x_test = to_layout(preprocess(x_test, preprocessing), layout)
    return split(name, x, y, layout, x_test=x_test, y_test=y_test)


def _load_preset_dir(path: Path, name: str, layout: str, preprocessing: dict) -> Dataset:
    from optimization.base import InvalidInputError

    if (path / "digits.npz").exists():
        with np.load(path / "digits.npz", allow_pickle=False) as data:
            return _finish_images(name, layout, preprocessing, data["x"], data["y"])
    mnist = {key: _find(path, stem) for key, stem in MNIST_FILES.items()}
    if all(mnist.values()):
        arrays = {key: _read_idx(file) for key, file in mnist.items()}
        as_images = {key: arrays[key][..., None].astype(np.float32) / 255.0 for key in ("x_train", "x_test")}
        return _finish_images(name, layout, preprocessing, as_images["x_train"], arrays["y_train"],
                              as_images["x_test"], arrays["y_test"])
    train_batches = sorted(path.glob("data_batch_*.bin"))
    if train_batches and (path / "test_batch.bin").exists():
        x, y = zip(*(_read_cifar(file) for file in train_batches))
        x_test, y_test = _read_cifar(path / "test_batch.bin")
        return _finish_images(name, layout, preprocessing, np.concatenate(x), np.concatenate(y), x_test, y_test)
    raise InvalidInputError(
        f"{path.name} holds no dataset EdgeOpt knows: expected digits.npz, the four MNIST idx files "
        "(train-images-idx3-ubyte, ...), or CIFAR-10 data_batch_*.bin and test_batch.bin"
    )


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """IDX (LeCun's MNIST format): zero, zero, a type code, the number of dimensions, big-endian
    32-bit sizes, then the data. Only unsigned bytes (0x08) occur in MNIST-style files."""
    import gzip

    from optimization.base import InvalidInputError

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InvalidInputError(f"{path.name} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise InvalidInputError(f"{path.name} is truncated: header says {shape}, {len(body)} bytes follow")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _read_cifar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from optimization.base import InvalidInputError

    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise InvalidInputError(f"{path.name} is not a CIFAR-10 binary batch ({CIFAR_RECORD}-byte records)")
    records = raw.reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    return images, records[:, 0].astype(np.int64)


def _load_npz(path: Path, name: str, layout: str) -> Dataset:
    from optimization.base import InvalidInputError

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as error:
        raise InvalidInputError(f"{path.name}: arrays must be plain numbers, not Python objects ({error})") from None
    except Exception as error:
        raise InvalidInputError(f"{path.name} is not a readable .npz file ({error})") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        given = ("x_train", "y_train", "x_test", "y_test")
    elif {"x", "y"} <= arrays.keys():
        given = ("x", "y")
    else:
        raise InvalidInputError(
            f"{path.name} has arrays {sorted(arrays)}; it needs x_train y_train x_test y_test, or x y"
        )
    for x_key, y_key in zip(given[::2], given[1::2]):
        x, y = arrays[x_key], arrays[y_key]
        if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.integer)):
            raise InvalidInputError(f"{path.name}: {x_key} must be numbers and {y_key} integer class labels")
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise InvalidInputError(
                f"{path.name}: {x_key} {x.shape} and {y_key} {y.shape} must hold the same number of samples, "
                "one label each"
            )
        if y.min() < 0:
            raise InvalidInputError(f"{path.name}: {y_key} has negative labels; classes are 0, 1, 2, ...")
    if len(given) == 4:
        return split(name, arrays["x_train"], arrays["y_train"], layout,
                     x_test=arrays["x_test"], y_test=arrays["y_test"])
    return split(name, arrays["x"], arrays["y"], layout)


def _load_image_folder_zip(path: Path, name: str, layout: str, preprocessing: dict) -> Dataset:
    import tempfile

    from optimization.base import InvalidInputError
    from optimization.safety.archives import safe_extract_zip

    with tempfile.TemporaryDirectory(prefix="edgeopt-imagefolder-") as tmp:
        safe_extract_zip(path, Path(tmp), max_total_bytes=MAX_IMAGEFOLDER_BYTES)
        root = Path(tmp)
        while True:  # a zip of a folder holds that folder: descend through single wrappers
            entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
            if len(entries) == 1 and entries[0].is_dir():
                root = entries[0]
            else:
                break
        parts = {p.name.lower(): p for p in entries if p.is_dir()}
        test_dir = parts.get("test") or parts.get("val")
        if "train" in parts and test_dir:
            classes = sorted(p.name for p in parts["train"].iterdir() if p.is_dir())
            x, y = _read_class_folders(parts["train"], classes, preprocessing)
            x_test, y_test = _read_class_folders(test_dir, classes, preprocessing)
            return _finish_images(name, layout, preprocessing, x, y, x_test, y_test)
        classes = sorted(p.name for p in entries if p.is_dir())
        if len(classes) < 2:
            raise InvalidInputError(
                f"{path.name} needs one folder per class (at least two), each holding that class's images"
            )
        x, y = _read_class_folders(root, classes, preprocessing)
        return _finish_images(name, layout, preprocessing, x, y)


def _read_class_folders(root: Path, classes: list[str], preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images as NHWC [0, 1]: grayscale when every image is, RGB otherwise (or as `channels` says),
    at the size `resize` gives (or their common size)."""
    from PIL import Image, UnidentifiedImageError

    from optimization.base import InvalidInputError
    from optimization.safety.images import image_size

    files = [(label, f) for label, c in enumerate(classes)
             for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InvalidInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders {classes}")
    images, labels = [], []
    for label, file in files:
        image_size(file, f"{file.name} in class {classes[label]!r}")  # the upload's cap, before decoding
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InvalidInputError(f"{file.name} in class {classes[label]!r} is not a readable image ({error})") from None
        labels.append(label)
    channels = preprocessing.get("channels") or (1 if all(i.mode in ("L", "1", "I;16") for i in images) else 3)
    mode = "L" if int(channels) == 1 else "RGB"
    size = preprocessing.get("resize")
    if size is None:
        sizes = {image.size for image in images}
        if len(sizes) > 1:
            raise InvalidInputError(
                f"the images have {len(sizes)} different sizes; give preprocessing.resize, e.g. [32, 32]"
            )
    arrays = []
    for image in images:
        image = image.convert(mode)
        if size is not None:
            image = image.resize((int(size[1]), int(size[0])), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(arrays), np.asarray(labels, dtype=np.int64)
