"""Hostile and malformed uploads are refused at the upload (400 that says what to do), from
their headers alone, before the worker ever sees them; nothing of them stays in storage."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from onnx import TensorProto, helper

from experiments.models import ModelFile
from tests.conftest import npz_bytes, png_header_only, zip_bytes

pytestmark = pytest.mark.django_db


def upload(client, experiment, name, data, **fields):
    return client.post(f"/api/experiments/{experiment.pk}/upload",
                       {"file": SimpleUploadedFile(name, data), **fields})


def npy_header_only(shape, descr="<f4") -> bytes:
    """A .npy that declares `shape` but carries none of its data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npz_arrays(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def onnx_bytes(domain: str = "", external: bool = False) -> bytes:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, dtype=np.float32))
    if external:
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 2],
                             data_location=TensorProto.EXTERNAL)
        weight.external_data.add(key="location", value="../../../../etc/passwd")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        nodes.append(helper.make_node("Mystery", ["y"], ["z"], domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
    output = "z" if domain else "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 2])], [weight])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def assert_refused(response, *words, storage_root=None):
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    for word in words:
        assert word in error, error
    assert "/tmp/" not in error and "/work/" not in error  # no server paths
    if storage_root is not None:
        assert not [p for p in storage_root.rglob("*") if p.is_file() and "upload-" in p.name]


def test_a_zip_bomb_dataset_is_refused_at_upload(client, ready_experiment, storage_root):
    bomb = npz_of({"a/one.png": b"\0" * (40 * 2**20), "b/two.png": b"\0" * 10})

    response = upload(client, ready_experiment, "images.zip", bomb, kind="dataset")

    assert_refused(response, "zip bomb", storage_root=storage_root)
    assert not ModelFile.objects.filter(role="dataset").exists()


def test_a_zip_of_twenty_thousand_entries_is_refused_at_upload(client, ready_experiment, storage_root):
    many = zip_bytes({f"class{i % 2}/{i}.png": b"" for i in range(20_000)})

    response = upload(client, ready_experiment, "images.zip", many, kind="dataset")

    assert_refused(response, "20000 entries", storage_root=storage_root)


def test_an_npz_declaring_a_huge_array_is_refused_from_its_header(client, ready_experiment, storage_root):
    huge = npz_of({"x.npy": npy_header_only((100_000, 64, 64, 3)), "y.npy": npy_header_only((100_000,), "<i8")})

    response = upload(client, ready_experiment, "data.npz", huge, kind="dataset")

    assert len(huge) < 2000
    assert_refused(response, "MiB", storage_root=storage_root)


def test_an_npz_with_an_object_array_is_refused(client, ready_experiment):
    objects = npz_arrays(x=np.array([{"a": 1}, None, 3, 4], dtype=object), y=np.arange(4))

    assert_refused(upload(client, ready_experiment, "data.npz", objects, kind="dataset"), "Python objects")


def test_an_npz_whose_labels_do_not_match_the_samples_is_refused(client, ready_experiment):
    mismatched = npz_arrays(x=np.zeros((4, 8, 8, 1), np.float32), y=np.arange(3))

    response = upload(client, ready_experiment, "data.npz", mismatched, kind="dataset")

    assert_refused(response, "4 samples", "3 labels")


def test_an_npz_with_unknown_array_names_says_which_it_needs(client, ready_experiment):
    response = upload(client, ready_experiment, "data.npz", npz_arrays(images=np.zeros((2, 2))), kind="dataset")

    assert_refused(response, "x_train", "images")


def test_a_well_formed_npz_is_still_accepted(client, ready_experiment):
    assert upload(client, ready_experiment, "data.npz", npz_bytes(), kind="dataset").status_code == 200


def test_an_onnx_file_with_external_data_is_refused_at_upload(client, new_experiment, storage_root):
    response = upload(client, new_experiment(), "model.onnx", onnx_bytes(external=True))

    assert_refused(response, "external data", storage_root=storage_root)


def test_an_onnx_file_with_a_custom_domain_is_refused_at_upload(client, new_experiment):
    response = upload(client, new_experiment(), "model.onnx", onnx_bytes(domain="com.example.custom"))

    assert_refused(response, "com.example.custom", "onnxruntime")


def test_an_onnx_file_that_is_not_a_model_is_refused(client, new_experiment):
    assert_refused(upload(client, new_experiment(), "model.onnx", b"\x08\x07garbage\xff\xff"), "ONNX")


def test_a_valid_onnx_file_is_accepted(client, new_experiment):
    model = onnx_bytes()
    onnx.checker.check_model(onnx.load_from_string(model))

    response = upload(client, new_experiment(), "model.onnx", model)

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ready"


def png_bytes(width: int, height: int) -> bytes:
    """A real small image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "PNG")
    return buffer.getvalue()


def image_folder(extra: dict[str, bytes] | None = None) -> bytes:
    images = {f"{label}/{i}.png": png_bytes(8, 8) for label in ("cats", "dogs") for i in range(3)}
    return zip_bytes({**images, **(extra or {})})


def test_a_well_formed_image_folder_is_accepted(client, ready_experiment):
    response = upload(client, ready_experiment, "images.zip", image_folder(), kind="dataset")

    assert response.status_code == 200, response.content


def test_an_image_declaring_a_hundred_megapixels_is_refused_by_name(client, ready_experiment, storage_root):
    bomb = image_folder({"dogs/huge.png": png_header_only(10_000, 10_000)})

    response = upload(client, ready_experiment, "images.zip", bomb, kind="dataset")

    assert len(bomb) < 10_000
    assert_refused(response, "'dogs/huge.png'", "10000x10000", "50 megapixels", storage_root=storage_root)


def test_a_file_named_png_that_is_not_an_image_is_refused_by_name(client, ready_experiment):
    response = upload(client, ready_experiment, "images.zip",
                      image_folder({"cats/notes.png": b"just text"}), kind="dataset")

    assert_refused(response, "'cats/notes.png'", "not a readable image")


def test_images_that_decode_past_the_dataset_limit_are_refused(client, ready_experiment, settings):
    settings.EDGEOPT_MAX_DATASET_MB = 1
    many = image_folder({f"cats/big{i}.png": png_header_only(1000, 1000) for i in range(2)})

    response = upload(client, ready_experiment, "images.zip", many, kind="dataset")

    assert_refused(response, "decodes to 2 MiB", "EDGEOPT_MAX_DATASET_MB")


def test_npz_samples_of_another_shape_than_the_model_takes_are_refused_with_the_layout(
        client, new_experiment):
    experiment = new_experiment(config={"input_shape": [1, 8, 8]})
    channels_last = npz_arrays(x=np.zeros((4, 8, 8, 1), np.float32), y=np.arange(4))

    response = upload(client, experiment, "data.npz", channels_last, kind="dataset")

    assert_refused(response, "(8, 8, 1)", "takes (1, 8, 8)", "channels first", "(4, 1, 8, 8)")


def test_npz_samples_of_the_model_shape_are_accepted(client, new_experiment):
    experiment = new_experiment(config={"input_shape": [1, 8, 8]})
    channels_first = npz_arrays(x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))

    assert upload(client, experiment, "data.npz", channels_first, kind="dataset").status_code == 200


def test_npz_whose_train_and_test_samples_differ_in_shape_is_refused(client, ready_experiment):
    split = npz_arrays(x_train=np.zeros((4, 1, 8, 8), np.float32), y_train=np.arange(4),
                       x_test=np.zeros((2, 1, 9, 9), np.float32), y_test=np.arange(2))

    response = upload(client, ready_experiment, "data.npz", split, kind="dataset")

    assert_refused(response, "x_train and x_test", "(1, 8, 8)", "(1, 9, 9)")


def test_npz_with_fractional_labels_is_refused(client, ready_experiment):
    fractional = npz_arrays(x=np.zeros((4, 8, 8, 1), np.float32), y=np.linspace(0, 1, 4))

    assert_refused(upload(client, ready_experiment, "data.npz", fractional, kind="dataset"), "integer class")


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_a_form_with_too_many_fields_answers_400_json(owner, new_experiment, settings, debug):
    settings.DEBUG, settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = debug, 10
    browser = Client(enforce_csrf_checks=True)  # the CSRF check parses the form first
    browser.force_login(owner)
    browser.get("/")  # the page sets the CSRF cookie
    fields = {f"field{i}": "x" for i in range(20)}

    response = upload(browser, new_experiment(), "model.onnx", onnx_bytes(), **fields)

    assert_refused(response, "more than 10 fields", "input_shape")


def test_a_form_with_too_many_files_answers_400_json(client, new_experiment, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 3
    files = [SimpleUploadedFile(f"m{i}.onnx", onnx_bytes()) for i in range(5)]

    response = client.post(f"/api/experiments/{new_experiment().pk}/upload", {"file": files})

    assert_refused(response, "more than 3 files", "one file")
