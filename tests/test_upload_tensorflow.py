"""TensorFlow uploads in the formats today's Keras writes by default, through the JSON API:
Keras 3 `.keras` / `.h5`, a Keras 3 `model.export()` SavedModel and a compiled tf_keras
SavedModel are accepted; what cannot run is refused or announced at the upload, before any
start. Untrained tiny models: the checks are static (the web process imports no TensorFlow)."""
from __future__ import annotations

import pytest

from tests.conftest import upload_file

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="session")
def tensorflow_files(tmp_path_factory):
    import keras

    from bench.corpus_tensorflow import functional_cnn, save
    from optimization.backends.tensorflow import keras as tf_keras

    folder = tmp_path_factory.mktemp("tf-uploads")
    cnn = functional_cnn()
    legacy = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), tf_keras.layers.Flatten(),
                                  tf_keras.layers.Dense(10)])
    legacy.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    @keras.saving.register_keras_serializable(package="user_uploads")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    inputs = keras.Input((4,))
    custom = keras.Model(inputs, keras.layers.Dense(2)(Doubler()(inputs)))
    images = keras.Input((8, 8, 3))
    number_over_tensor = keras.Model(images, keras.layers.GlobalAveragePooling2D()(1.0 / (images + 1.0)))
    return {"keras": save(cnn, "keras", folder, "cnn"),
            "h5": save(functional_cnn(keras_ops=False), "h5", folder, "cnn_plain"),
            "h5_with_ops": save(cnn, "h5", folder, "cnn_ops"),
            "h5_number_over_tensor": save(number_over_tensor, "h5", folder, "number_over_tensor"),
            "export": save(cnn, "export", folder, "cnn"),
            "savedmodel": save(legacy, "savedmodel", folder, "legacy"),
            "custom": save(custom, "keras", folder, "custom")}


def upload(client, experiment, path):
    return client.post(f"/api/experiments/{experiment.pk}/upload", {"file": upload_file(path)})


@pytest.mark.parametrize("kind", ["keras", "h5", "h5_with_ops", "savedmodel"])
def test_keras3_files_and_a_compiled_savedmodel_are_accepted_for_all_techniques(
        client, new_experiment, tensorflow_files, kind):
    experiment = new_experiment(framework="tensorflow")

    response = upload(client, experiment, tensorflow_files[kind])

    assert response.status_code == 200, response.json()
    assert response.json()["status"] == "ready"
    assert "post_training_only" not in response.json()["config"]


def test_an_exported_savedmodel_is_accepted_and_says_training_techniques_will_be_skipped(
        client, new_experiment, tensorflow_files):
    experiment = new_experiment(framework="tensorflow")

    response = upload(client, experiment, tensorflow_files["export"])

    assert response.status_code == 200, response.json()
    note = response.json()["config"]["post_training_only"]
    assert "training techniques" in note and "skipped" in note and "model.save" in note
    assert client.get(f"/api/experiments/{experiment.pk}").json()["config"]["post_training_only"] == note


@pytest.mark.parametrize("kind, words", [("custom", "built-in Keras"), ("h5_number_over_tensor", "Save the model as .keras")])
def test_keras3_files_that_cannot_be_converted_are_refused_with_what_to_do(
        client, new_experiment, tensorflow_files, kind, words):
    experiment = new_experiment(framework="tensorflow")

    response = upload(client, experiment, tensorflow_files[kind])

    assert response.status_code == 400
    assert words in response.json()["error"]
    assert client.get(f"/api/experiments/{experiment.pk}").json()["status"] == "created"
