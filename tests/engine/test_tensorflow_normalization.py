"""An adapted Keras Normalization after Rescaling(1/255), Keras's usual preprocessing head, in
the INT8 files: the converter quantized its SUB on the grid of the DIV after it, 1 / std times
coarser, so pixels reached the network ~3.4 gray levels a step; the engine converts the head as
one per-channel affine op (`_common.normalization_as_affine`)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.corpus_tensorflow import litert_accuracy, npz_bytes, save, train
from optimization.backends.tensorflow import BACKEND
from optimization.base import TechniqueConfig
from optimization.datasets import load_dataset
from optimization.techniques import get_technique

SIDE, CLASSES = 4, 10


def tinted_images(n: int = 1200, seed: int = 0):
    """8-bit 4x4 images of one flat tint per class, the tints a few gray levels apart (around 128,
    each channel 0-11 levels up), with a little sensor noise: classes a float network tells
    apart at once, and that only a head keeping every gray level keeps apart."""
    rng = np.random.default_rng(seed)
    tints = 124 + rng.permutation(12 ** 3)[:CLASSES, None] // 12 ** np.arange(3) % 12
    y = rng.integers(0, CLASSES, n)
    noise = rng.normal(0, 0.4, (n, SIDE, SIDE, 3))
    return np.clip(np.round(tints[y, None, None, :] + noise), 0, 255).astype(np.float32), y


def normalized_cnn(x_adapt):
    """Rescaling(1/255) and a Normalization adapted on the rescaled images (per channel: mean
    ~0.5, variance ~1e-4), a convolution, global pooling, Dense(10): Keras 3, as users save."""
    import keras
    from keras import layers

    normalization = layers.Normalization()
    normalization.adapt(x_adapt / 255.0)
    inputs = keras.Input((SIDE, SIDE, 3))
    x = normalization(layers.Rescaling(1.0 / 255.0)(inputs))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x))


@pytest.fixture(scope="module")
def tinted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinted")
    x, y = tinted_images()
    (folder / "data.npz").write_bytes(npz_bytes(x, y))
    dataset = load_dataset(folder / "data.npz", "custom", "NHWC")
    trained = train(normalized_cnn(dataset.x_train), dataset.x_train, dataset.y_train, epochs=10, learning_rate=1e-2)
    model = BACKEND.load(save(trained, "keras", folder, "tinted"))
    BACKEND.verify_conversion(model, dataset.x_calib)
    float_accuracy = litert_accuracy(BACKEND.export_deploy(model, folder / "fp32.tflite"),
                                     dataset.x_test, dataset.y_test)
    return {"model": model, "dataset": dataset, "float_accuracy": float_accuracy}


# without the rewrite, PTQ INT8 lost 15-20 pt here in every run; QAT and hybrid 0-7.5 pt (the
# trainings are not bit-reproducible), PTQ INT4 none: those three guard against regressions
@pytest.mark.parametrize("name, options", [
    ("ptq_int8", {"weight_granularity": "per_channel"}),
    ("ptq_int8", {"weight_granularity": "per_tensor"}),
    ("ptq_int4", {}),
    ("qat", {"epochs": 0}),
    ("hybrid", {"structured_first": False, "epochs": 1, "qat_epochs": 0}),
])
def test_int8_keeps_the_accuracy_of_a_model_with_an_adapted_normalization(tinted, tmp_path,
                                                                          name, options):
    dataset = tinted["dataset"]
    assert tinted["float_accuracy"] > 0.9  # the float model tells the tints apart
    result = get_technique("tensorflow", name).optimize(
        tinted["model"], TechniqueConfig(output_dir=tmp_path, options=options), dataset,
        lambda *_: None)
    accuracy = litert_accuracy(result.artifacts["deploy"], dataset.x_test, dataset.y_test)
    assert accuracy >= tinted["float_accuracy"] - 0.02, (accuracy, tinted["float_accuracy"])


def test_the_head_becomes_one_affine_op_with_the_same_outputs_and_an_identity_stays():
    """In a Sequential model too (its Rescaling is its first layer); EfficientNet's
    Normalization (mean 0, variance 1) is dropped by the converter and left alone."""
    from optimization.backends.tensorflow import keras
    from optimization.techniques.tensorflow._common import normalization_as_affine

    x, _ = tinted_images(n=32)
    adapted = keras.layers.Normalization()
    adapted.adapt(x / 255.0)
    model = keras.Sequential([keras.Input((SIDE, SIDE, 3)), keras.layers.Rescaling(1 / 255.0),
                              adapted, keras.layers.Conv2D(4, 3), keras.layers.Flatten()])

    rewritten, folded = normalization_as_affine(model, x)

    assert [type(layer).__name__ for layer in rewritten.layers] == ["DepthwiseConv2D", "Conv2D", "Flatten"]
    assert folded[0]["layers"] == [model.layers[0].name, adapted.name]
    np.testing.assert_allclose(rewritten.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)

    identity = keras.Sequential([keras.Input((SIDE, SIDE, 3)), keras.layers.Rescaling(1 / 255.0),
                                 keras.layers.Normalization(mean=0.0, variance=1.0),
                                 keras.layers.Conv2D(4, 3)])
    assert normalization_as_affine(identity, x) == (identity, [])


def test_int8_keeps_a_head_whose_rescaling_shrinks_the_input_to_a_sliver(tmp_path):
    """Images already scaled to [0, 1] meet the model's Rescaling(1/255): the Normalization,
    adapted on what it sees, subtracts a mean of ~0.002 and divides by a std of ~0.001. On the
    DIV's grid every SUB output rounded to zero and PTQ INT8 fell to chance (8% of 10 classes)."""
    import keras
    from keras import layers

    from tests.test_full_experiments import prototype_dataset

    x, y = prototype_dataset((16, 16, 3), n=600, classes=CLASSES)
    assert x.max() <= 1.0
    (tmp_path / "data.npz").write_bytes(npz_bytes(x, y))
    dataset = load_dataset(tmp_path / "data.npz", "custom", "NHWC")
    normalization = layers.Normalization()
    normalization.adapt(dataset.x_train / 255.0)
    inputs = keras.Input((16, 16, 3))
    h = normalization(layers.Rescaling(1.0 / 255.0)(inputs))
    h = layers.GlobalAveragePooling2D()(layers.Conv2D(16, 3, padding="same", activation="relu")(h))
    trained = train(keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(h)),
                    dataset.x_train, dataset.y_train, epochs=8, learning_rate=1e-2)
    model = BACKEND.load(save(trained, "keras", tmp_path, "sliver"))
    float_accuracy = litert_accuracy(BACKEND.export_deploy(model, tmp_path / "fp32.tflite"),
                                     dataset.x_test, dataset.y_test)
    assert float_accuracy > 0.9

    result = get_technique("tensorflow", "ptq_int8").optimize(
        model, TechniqueConfig(output_dir=tmp_path / "int8"), dataset, lambda *_: None)

    assert litert_accuracy(result.artifacts["deploy"], dataset.x_test, dataset.y_test) >= float_accuracy - 0.02
    assert result.details["normalization_as_affine"]
