"""The TensorFlow backend: safe loading of .keras / .h5 / SavedModel zips, refusals of files
that would run code, LiteRT prediction and latency. Tiny untrained models: no training here."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from optimization.backends.tensorflow import BACKEND, keras, tf
from optimization.base import UnsafeModelError
from optimization.safety.keras_check import check_keras_file


def tiny_cnn():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, padding="same"),
                             keras.layers.BatchNormalization(), keras.layers.ReLU(),
                             keras.layers.Flatten(), keras.layers.Dense(10)])


def model_with_lambda(marker: Path):
    """A model whose Lambda writes `marker` whenever its code runs."""
    inputs = keras.Input((8, 8, 1))
    marker_name = str(marker)  # a closure over a str serializes; over a Path it would not
    marked = keras.layers.Lambda(lambda t: (open(marker_name, "w").close(), t)[1])(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(marked)))


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in folder.rglob("*"):
            archive.write(file, file.relative_to(folder))
    return zip_path


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_and_h5_files_load_with_the_input_shape_of_the_model(tmp_path, suffix):
    original = tiny_cnn()
    path = tmp_path / f"model{suffix}"
    original.save(path)
    loaded = BACKEND.load(path)
    assert loaded.input_shape == (8, 8, 1)
    assert loaded.num_classes == 10
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.module.predict(x, verbose=0), original.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_savedmodel_zip_loads_after_the_graph_check(tmp_path):
    tiny_cnn().save(tmp_path / "saved")
    loaded = BACKEND.load(zip_folder(tmp_path / "saved", tmp_path / "saved.zip"))
    assert loaded.source_format == "savedmodel"
    assert loaded.input_shape == (8, 8, 1)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_lambda_layer_is_refused_and_its_code_never_runs(tmp_path, suffix):
    marker = tmp_path / "lambda_ran"
    path = tmp_path / f"lambda{suffix}"
    model_with_lambda(marker).save(path)
    marker.unlink(missing_ok=True)  # building and saving the model ran it; loading must not
    with pytest.raises(UnsafeModelError, match="Lambda"):
        BACKEND.load(path)
    assert not marker.exists()


def test_keras_check_refuses_a_lambda_inside_a_nested_model(tmp_path):
    inner_input = keras.Input((4,))
    inner = keras.Model(inner_input, keras.layers.Lambda(lambda t: t * 2)(inner_input), name="inner")
    outer_input = keras.Input((4,))
    path = tmp_path / "nested.keras"
    keras.Model(outer_input, keras.layers.Dense(2)(inner(outer_input))).save(path)
    with pytest.raises(UnsafeModelError, match="Lambda"):
        check_keras_file(path)


def test_a_zip_with_parent_entries_is_refused_and_writes_nothing_outside(tmp_path):
    upload_dir = tmp_path / "uploads"
    upload_dir.mkdir()
    path = upload_dir / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("saved_model.pb", b"")
        archive.writestr("../escaped.txt", b"outside")
    with pytest.raises(UnsafeModelError):
        BACKEND.load(path)
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in upload_dir.iterdir()) == ["evil.zip"]


@pytest.mark.parametrize("file_op", ["write", "read"])
def test_a_savedmodel_that_touches_files_is_refused(tmp_path, file_op):
    target = str(tmp_path / "touched.txt")

    class FileToucher(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            if file_op == "write":
                tf.io.write_file(target, tf.strings.as_string(tf.reduce_sum(x)))
            else:
                x = x + tf.strings.to_number(tf.io.read_file(target))
            return x

    tf.saved_model.save(FileToucher(), str(tmp_path / "toucher"))
    with pytest.raises(UnsafeModelError, match="File"):
        BACKEND.load(zip_folder(tmp_path / "toucher", tmp_path / "toucher.zip"))


@pytest.mark.slow
def test_mobilenet_v2_from_keras_applications_passes_the_allowlist_and_loads(tmp_path):
    from optimization.zoo.keras import mobilenet_v2_small

    path = tmp_path / "mobilenet.keras"
    mobilenet_v2_small().save(path)
    loaded = BACKEND.load(path)
    assert loaded.input_shape == (32, 32, 3)
    assert loaded.num_classes == 10


def test_predict_in_litert_matches_keras_for_a_batch(tmp_path):
    tiny_cnn().save(tmp_path / "tiny.keras")
    loaded = BACKEND.load(tmp_path / "tiny.keras")
    deploy = BACKEND.export_deploy(loaded, tmp_path / "tiny.tflite")
    x = np.random.default_rng(1).random((300, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(BACKEND.predict(deploy, x), loaded.module.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-4)
    assert BACKEND.latency_ms(deploy, x[:1]) > 0


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_compacted_tensor_names_leave_the_model_as_it_was(tmp_path, int8):
    from ai_edge_litert.interpreter import Interpreter

    from optimization.analyzer import analyze
    from optimization.backends.tensorflow import compact_tensor_names, write_bytes
    from optimization.graph import load_graph

    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(4, 3, padding="same", use_bias=False),
                              layers.BatchNormalization(), layers.ReLU(), layers.Flatten(), layers.Dense(10)],
                             name="a_rather_long_model_name_scope")
    x = np.random.default_rng(2).random((64, 8, 8, 1), dtype=np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([sample[None]] for sample in x[:16])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    raw = converter.convert()
    full = write_bytes(raw, tmp_path / "full.tflite")
    compact = write_bytes(compact_tensor_names(raw), tmp_path / "compact.tflite")

    assert compact.stat().st_size < full.stat().st_size
    np.testing.assert_array_equal(BACKEND.predict(compact, x), BACKEND.predict(full, x))
    names = [op.name for op in load_graph(compact).ops]
    assert len(set(names)) == len(names) and not any(";" in n or "a_rather_long" in n for n in names)
    assert Interpreter(model_path=str(compact)).get_signature_list() == \
        Interpreter(model_path=str(full)).get_signature_list()
    before, after = analyze(full), analyze(compact)
    assert (after["params"], after["macs"], after["peak_activation_bytes"]) == \
        (before["params"], before["macs"], before["peak_activation_bytes"])
