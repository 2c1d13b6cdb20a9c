"""Uploads: extension, size, magic bytes and the engine's static safety checks, and a
refused upload never costs the model that was already stored."""
from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from experiments.models import Experiment, ModelFile
from tests.conftest import npz_bytes, upload_file, zip_bytes

pytestmark = pytest.mark.django_db


def upload(client, experiment, file, **fields):
    return client.post(f"/api/experiments/{experiment.pk}/upload", {"file": file, **fields})


def stored_files(storage_root):
    return sorted(p.relative_to(storage_root).as_posix() for p in storage_root.rglob("*") if p.is_file())


def test_torchscript_upload_makes_the_experiment_ready(client, new_experiment, model_files, storage_root):
    experiment = new_experiment(name="My CNN!")

    response = upload(client, experiment, upload_file(model_files["pt"], "../../evil name.pt"), input_shape="1,8,8")

    assert response.status_code == 200, response.json()
    assert response.json()["status"] == "ready"
    stored = ModelFile.objects.get(experiment=experiment, role="upload")
    assert stored.path == f"models/custom/pytorch/exp{experiment.pk}_my-cnn.pt"
    assert (storage_root / stored.path).read_bytes() == model_files["pt"].read_bytes()
    assert not list((storage_root / "models" / ".incoming").iterdir()), "the temp copy is moved, not left behind"


def test_state_dict_upload_with_architecture_and_input_shape_is_accepted(client, new_experiment, model_files):
    experiment = new_experiment()

    response = upload(client, experiment, upload_file(model_files["state_dict"]),
                      architecture="digits_cnn", input_shape="1,8,8")

    assert response.status_code == 200, response.json()
    assert response.json()["config"] == {"architecture": "digits_cnn", "input_shape": [1, 8, 8]}


def test_state_dict_upload_without_architecture_returns_400_saying_what_to_do(client, new_experiment, model_files):
    experiment = new_experiment()

    response = upload(client, experiment, upload_file(model_files["state_dict"]))

    assert response.status_code == 400
    assert "architecture" in response.json()["error"]


@pytest.mark.parametrize("name", ["model.exe", "model.keras", "model", "weights.npz"])
def test_upload_with_a_wrong_extension_returns_400(client, new_experiment, model_files, name):
    experiment = new_experiment()

    response = upload(client, experiment, upload_file(model_files["pt"], name))

    assert response.status_code == 400
    assert ".pt2" in response.json()["error"]


@pytest.mark.parametrize("name", ["model.pt", "model.pt2", "model.onnx"])
def test_upload_of_garbage_bytes_returns_400(client, new_experiment, name):
    experiment = new_experiment()

    response = upload(client, experiment, SimpleUploadedFile(name, b"this is not a model at all"))

    assert response.status_code == 400
    assert "not a valid" in response.json()["error"]
    assert Experiment.objects.get(pk=experiment.pk).status == "created"


def test_garbage_keras_and_h5_uploads_return_400(client, new_experiment):
    experiment = new_experiment(framework="tensorflow")

    for name in ("model.keras", "model.h5"):
        response = upload(client, experiment, SimpleUploadedFile(name, b"\x00" * 64))
        assert response.status_code == 400


def test_oversized_upload_returns_413(client, new_experiment, settings):
    settings.EDGEOPT_MAX_UPLOAD_MB = 1
    experiment = new_experiment()

    response = upload(client, experiment, SimpleUploadedFile("big.pt", b"PK\x03\x04" + b"\x00" * (2 * 2**20)))

    assert response.status_code == 413
    assert "1 MB" in response.json()["error"]


@pytest.mark.parametrize("file_key", ["whole", "trojan", "trojan_legacy"])
def test_pickled_whole_model_or_code_returns_400_and_runs_nothing(client, new_experiment, model_files, file_key):
    experiment = new_experiment()

    response = upload(client, experiment, upload_file(model_files[file_key], "model.pth"),
                      architecture="digits_cnn")

    assert response.status_code == 400
    assert response.json()["error"]
    assert not model_files["marker"].exists(), "the pickle's code must never run"
    assert not ModelFile.objects.filter(experiment=experiment).exists()


def test_a_second_bad_upload_keeps_the_first_good_model(client, new_experiment, model_files, storage_root):
    experiment = new_experiment()
    assert upload(client, experiment, upload_file(model_files["pt"]), input_shape="1,8,8").status_code == 200
    before = stored_files(storage_root)

    response = upload(client, experiment, SimpleUploadedFile("model.pt", b"PK\x03\x04 broken zip"))

    assert response.status_code == 400
    assert stored_files(storage_root) == before
    experiment.refresh_from_db()
    assert experiment.status == "ready"
    assert experiment.source_model().absolute_path().read_bytes() == model_files["pt"].read_bytes()


def test_a_new_model_replaces_the_pretrained_one_and_keeps_the_shared_file(
        client, ready_experiment, model_files, pretrained_model):
    response = upload(client, ready_experiment, upload_file(model_files["pt"]), input_shape="1,8,8")

    assert response.status_code == 200
    assert response.json()["model"]["role"] == "upload"
    assert pretrained_model.exists()


def test_npz_dataset_upload_switches_the_experiment_to_custom(client, ready_experiment, storage_root):
    response = upload(client, ready_experiment, SimpleUploadedFile("mine.npz", npz_bytes()), kind="dataset")

    assert response.status_code == 200, response.json()
    assert response.json()["dataset"] == "custom"
    stored = ModelFile.objects.get(experiment=ready_experiment, role="dataset")
    assert stored.path.startswith(f"dataset/custom/pytorch/exp{ready_experiment.pk}_")
    assert (storage_root / stored.path).is_file()


@pytest.mark.parametrize("name, data", [
    ("data.npz", zip_bytes({"a.npy": b"1"})),
    ("images.zip", zip_bytes({"only/one.png": b"1"})),
    ("images.zip", zip_bytes({"../escape/a.png": b"1", "b/b.png": b"2"})),
    ("data.csv", b"1,2,3"),
])
def test_malformed_dataset_upload_returns_400(client, ready_experiment, name, data):
    response = upload(client, ready_experiment, SimpleUploadedFile(name, data), kind="dataset")

    assert response.status_code == 400
    assert response.json()["error"]


def test_tensorflow_savedmodel_zip_without_saved_model_pb_returns_400(client, new_experiment):
    experiment = new_experiment(framework="tensorflow")

    response = upload(client, experiment, SimpleUploadedFile("model.zip", zip_bytes({"variables/x": b"1"})))

    assert response.status_code == 400
    assert "saved_model.pb" in response.json()["error"]


def test_upload_while_running_returns_409(client, ready_experiment, model_files):
    ready_experiment.enqueue()

    response = upload(client, ready_experiment, upload_file(model_files["pt"]))

    assert response.status_code == 409


def test_upload_with_unknown_kind_returns_400(client, new_experiment, model_files):
    experiment = new_experiment()

    response = upload(client, experiment, upload_file(model_files["pt"]), kind="weights")

    assert response.status_code == 400
    assert "kind" in response.json()["error"]


def test_oversized_file_is_refused_by_the_service_too(settings, storage_root):
    """The pages post through CSRF middleware, which reads the body first: the size check
    in the service catches what the API's Content-Length check cannot."""
    from experiments.services import ServiceError, check_upload

    settings.EDGEOPT_MAX_UPLOAD_MB = 1

    with pytest.raises(ServiceError) as refused:
        check_upload("pytorch", SimpleUploadedFile("big.pt", b"PK\x03\x04" + b"\x00" * (2 * 2**20)))

    assert refused.value.status == 413
    assert not (storage_root / "models" / ".incoming").exists() or not any(
        (storage_root / "models" / ".incoming").iterdir())


def test_torchscript_without_input_shape_returns_400_asking_for_it(client, new_experiment, model_files, storage_root):
    experiment = new_experiment()

    response = upload(client, experiment, upload_file(model_files["pt"]))

    assert response.status_code == 400
    assert "input_shape" in response.json()["error"] and ".pt2" in response.json()["error"]
    assert stored_files(storage_root) == []


def test_torchscript_without_input_shape_is_accepted_when_the_experiment_has_one(
        client, new_experiment, model_files):
    experiment = new_experiment(config={"input_shape": [1, 8, 8]})

    response = upload(client, experiment, upload_file(model_files["pt"]))

    assert response.status_code == 200, response.json()
    assert response.json()["config"]["input_shape"] == [1, 8, 8]


@pytest.mark.parametrize("file_key, name, words", [
    ("state_dict", "model.pt", ["torch.save", ".pth"]),
    ("exported", "model.pt", ["torch.export", ".pt2"]),
    ("pt", "model.pt2", ["torch.export.save", "TorchScript file is a .pt"]),
])
def test_a_torch_file_under_another_suffix_says_which_name_it_needs(client, new_experiment, model_files, file_key,
                                                                     name, words):
    response = upload(client, new_experiment(), upload_file(model_files[file_key], name), input_shape="1,8,8")

    assert response.status_code == 400
    assert all(word in response.json()["error"] for word in words), response.json()


def test_state_dict_with_an_unknown_architecture_returns_400_listing_the_built_in_ones(
        client, new_experiment, model_files):
    response = upload(client, new_experiment(), upload_file(model_files["state_dict"]), architecture="resnet50")

    assert response.status_code == 400
    assert "digits_cnn, mobilenet_v2, resnet_small" in response.json()["error"]


def test_state_dict_of_another_architecture_returns_400_naming_the_missing_weights(
        client, new_experiment, model_files):
    response = upload(client, new_experiment(), upload_file(model_files["state_dict"]), architecture="resnet_small")

    assert response.status_code == 400
    assert "does not hold the weights of 'resnet_small'" in response.json()["error"]
    assert "missing" in response.json()["error"]


def test_state_dict_with_an_input_shape_of_other_channels_returns_400(client, new_experiment, model_files):
    response = upload(client, new_experiment(), upload_file(model_files["state_dict"]),
                      architecture="digits_cnn", input_shape="3,8,8")

    assert response.status_code == 400
    assert "take 1" in response.json()["error"]


def onnx_with_external_weights(location: str) -> tuple[bytes, bytes]:
    """(a Flatten -> MatMul model whose weight lives in an external file at `location`, that
    file's bytes): what torch.onnx.export writes by default, built with onnx alone."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    tensor = numpy_helper.from_array(weight, "weight")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weight.nbytes))):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "weight"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=[tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), weight.tobytes()


def test_a_zip_of_an_onnx_model_and_its_external_data_file_is_accepted(client, new_experiment, storage_root):
    experiment = new_experiment()
    model, data = onnx_with_external_weights("model.onnx.data")

    response = upload(client, experiment, SimpleUploadedFile(
        "export.zip", zip_bytes({"export/model.onnx": model, "export/model.onnx.data": data})))

    assert response.status_code == 200, response.json()
    assert response.json()["status"] == "ready"
    assert ModelFile.objects.get(experiment=experiment, role="upload").path.endswith(".zip")


@pytest.mark.parametrize("location", ["../model.onnx.data", "/etc/passwd", "other.data", "C:\\model.onnx.data"])
def test_an_onnx_zip_whose_data_location_is_not_a_file_beside_the_model_returns_400(client, new_experiment,
                                                                                   location):
    experiment = new_experiment()
    model, data = onnx_with_external_weights(location)

    response = upload(client, experiment, SimpleUploadedFile(
        "export.zip", zip_bytes({"export/model.onnx": model, "export/model.onnx.data": data, "model.onnx.data": data})))

    assert response.status_code == 400
    assert "not one of the files beside the model" in response.json()["error"]
    assert Experiment.objects.get(pk=experiment.pk).status == "created"


def test_an_onnx_zip_must_hold_exactly_one_model(client, new_experiment):
    experiment = new_experiment()
    model, data = onnx_with_external_weights("model.onnx.data")

    two = upload(client, experiment, SimpleUploadedFile(
        "export.zip", zip_bytes({"a.onnx": model, "b.onnx": model, "model.onnx.data": data})))
    none = upload(client, experiment, SimpleUploadedFile("export.zip", zip_bytes({"model.onnx.data": data})))

    assert two.status_code == none.status_code == 400
    assert "exactly one .onnx model" in two.json()["error"] and "holds 0" in none.json()["error"]


def test_a_lone_onnx_with_external_data_returns_400_asking_for_the_zip(client, new_experiment):
    experiment = new_experiment()
    model, _ = onnx_with_external_weights("model.onnx.data")

    response = upload(client, experiment, SimpleUploadedFile("model.onnx", model))

    assert response.status_code == 400
    assert "upload a .zip holding the .onnx and its data file(s)" in response.json()["error"]
