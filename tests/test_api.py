"""The JSON API of API.md: status codes, error bodies, state checks, downloads, delete."""
from __future__ import annotations

import json

import pytest
from django_q.models import OrmQ

from experiments.models import Experiment, ExperimentProgress, ModelFile, OptimizationRun, Recommendation
from tests.conftest import DEMO_BODY

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    ("get", "/api/experiments/{id}"),
    ("delete", "/api/experiments/{id}"),
    ("post", "/api/experiments/{id}/upload"),
    ("post", "/api/experiments/{id}/start"),
    ("post", "/api/experiments/{id}/stop"),
    ("get", "/api/experiments/{id}/results"),
    ("get", "/api/experiments/{id}/recommendation"),
    ("get", "/api/experiments/{id}/download/ptq_int8"),
    ("get", "/api/experiments/{id}/download/baseline"),
]


def post_json(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def test_create_returns_201_with_the_experiment(client):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, "techniques": ["ptq_int8", "qat"]})

    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "created"
    assert body["techniques"] == ["ptq_int8", "qat"]
    for field in ("id", "name", "framework", "target_device", "dataset", "goal", "constraints",
                  "created_at", "progress", "analysis"):
        assert field in body
    assert Experiment.objects.filter(pk=body["id"]).exists()


def test_create_without_techniques_selects_all_seven(client):
    body = post_json(client, "/api/experiments/create", DEMO_BODY).json()

    assert len(body["techniques"]) == 7


def test_create_with_a_pretrained_model_is_ready(client, pretrained_model):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, "pretrained_model": "digits_cnn"})

    assert response.status_code == 201
    assert response.json()["status"] == "ready"
    assert response.json()["model"]["role"] == "pretrained"


def test_create_with_a_missing_pretrained_model_says_to_run_seed_demo(client):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, "pretrained_model": "digits_cnn"})

    assert response.status_code == 400
    assert "seed_demo" in response.json()["error"]


@pytest.mark.parametrize("change, word", [
    ({"framework": "caffe"}, "framework"),
    ({"target_device": "toaster"}, "target_device"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"goal": "fastest"}, "goal"),
    ({"techniques": ["ptq_int8", "magic"]}, "techniques"),
    ({"constraints": {"max_size_mb": -1}}, "constraints"),
    ({"constraints": {"max_fun": 1}}, "constraints"),
    ({"config": {"techniques": {"qat": {"epochs": "many"}}}}, "config"),
    ({"pretrained_model": "../../settings"}, "pretrained_model"),
])
def test_create_with_bad_input_returns_400_naming_the_field(client, change, word):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, **change})

    assert response.status_code == 400
    assert word in response.json()["error"]


def test_create_with_a_body_that_is_not_json_returns_415(client):
    response = client.post("/api/experiments/create", data="name=x", content_type="text/plain")

    assert response.status_code == 415
    assert "application/json" in response.json()["error"]
    assert not Experiment.objects.exists()


def test_create_with_malformed_json_returns_400(client):
    response = client.post("/api/experiments/create", data="{name", content_type="application/json")

    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


def test_create_with_unknown_field_returns_400_naming_allowed_fields(client):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, "technique": ["qat"]})

    assert response.status_code == 400
    error = response.json()["error"]
    assert "technique" in error and "techniques" in error and "constraints" in error
    assert not Experiment.objects.exists()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_create_with_a_non_finite_constraint_returns_400(client, number):
    body = json.dumps(DEMO_BODY)[:-1] + f', "constraints": {{"max_size_mb": {number}}}}}'
    body = body.replace('"constraints": {"max_accuracy_drop": 1.0}, ', "")

    response = client.post("/api/experiments/create", data=body, content_type="application/json")

    assert response.status_code == 400
    assert "finite" in response.json()["error"]
    assert not Experiment.objects.exists()


def test_create_with_deeply_nested_json_returns_400(client):
    body = '{"name": ' + "[" * 100_000 + "]" * 100_000 + "}"

    response = client.post("/api/experiments/create", data=body, content_type="application/json")

    assert response.status_code == 400
    assert "nested" in response.json()["error"]


@pytest.mark.parametrize("change, word", [
    ({"name": 7}, "name"),
    ({"framework": ["pytorch"]}, "framework"),
    ({"techniques": "qat"}, "techniques"),
    ({"techniques": [1, 2]}, "techniques"),
    ({"constraints": {"max_size_mb": "2"}}, "max_size_mb"),
    ({"constraints": {"max_size_mb": True}}, "max_size_mb"),
    ({"constraints": [1]}, "constraints"),
])
def test_create_with_a_wrongly_typed_field_returns_400(client, change, word):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, **change})

    assert response.status_code == 400
    assert word in response.json()["error"]


def test_create_accepts_an_energy_limit(client):
    response = post_json(client, "/api/experiments/create", {**DEMO_BODY, "constraints": {"max_energy_mj": 5}})

    assert response.status_code == 201
    assert response.json()["constraints"] == {"max_energy_mj": 5}


def test_upload_that_is_not_multipart_returns_415(client, new_experiment):
    experiment = new_experiment()

    response = client.post(f"/api/experiments/{experiment.pk}/upload", data=b"\x00" * 10,
                              content_type="application/octet-stream")

    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]


def test_list_returns_every_experiment(client, new_experiment):
    first, second = new_experiment(name="a"), new_experiment(name="b")

    body = client.get("/api/experiments").json()

    assert {e["id"] for e in body["experiments"]} == {first.pk, second.pk}


@pytest.mark.parametrize("method, url", ENDPOINTS)
def test_unknown_experiment_returns_404_json_on_every_endpoint(client, method, url):
    response = getattr(client, method)(url.format(id=987654))

    assert response.status_code == 404
    assert "987654" in response.json()["error"]


@pytest.mark.parametrize("method, url", [
    ("get", "/api/experiments/create"),
    ("post", "/api/experiments"),
    ("put", "/api/experiments/{id}"),
    ("get", "/api/experiments/{id}/start"),
    ("get", "/api/experiments/{id}/stop"),
    ("get", "/api/experiments/{id}/upload"),
    ("post", "/api/experiments/{id}/results"),
    ("delete", "/api/experiments/{id}/download/ptq_int8"),
])
def test_wrong_method_returns_405_json(client, new_experiment, method, url):
    experiment = new_experiment()

    response = getattr(client, method)(url.format(id=experiment.pk))

    assert response.status_code == 405
    assert "not allowed" in response.json()["error"]


def test_detail_shows_the_progress_message(client, new_experiment):
    experiment = new_experiment()

    body = client.get(f"/api/experiments/{experiment.pk}").json()

    assert body["progress"]["type"] == "status"
    assert body["progress"]["status"] == "created"


def test_start_without_model_returns_409(client, new_experiment):
    experiment = new_experiment()

    response = client.post(f"/api/experiments/{experiment.pk}/start")

    assert response.status_code == 409
    assert "model" in response.json()["error"]


def test_start_with_custom_dataset_not_uploaded_returns_409(client, new_experiment, pretrained_model):
    experiment = new_experiment(dataset="custom", pretrained_model="digits_cnn")

    response = client.post(f"/api/experiments/{experiment.pk}/start")

    assert response.status_code == 409
    assert "dataset" in response.json()["error"]


def test_start_queues_the_task_after_commit(client, ready_experiment, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/api/experiments/{ready_experiment.pk}/start")

    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert OrmQ.objects.count() == 1
    assert OrmQ.objects.get().func() == "experiments.tasks.run_experiment"
    assert ExperimentProgress.objects.get(experiment=ready_experiment).status == "queued"


def test_start_twice_returns_409(client, ready_experiment):
    client.post(f"/api/experiments/{ready_experiment.pk}/start")

    response = client.post(f"/api/experiments/{ready_experiment.pk}/start")

    assert response.status_code == 409


def test_restarting_a_finished_experiment_clears_its_old_results(client, finished_experiment, storage_root):
    old_artifact = storage_root / "models" / "optimized" / str(finished_experiment.pk) / "ptq_int8.onnx"
    assert old_artifact.exists()

    response = client.post(f"/api/experiments/{finished_experiment.pk}/start")

    assert response.status_code == 202
    assert not OptimizationRun.objects.filter(experiment=finished_experiment).exists()
    assert not Recommendation.objects.filter(experiment=finished_experiment).exists()
    assert not old_artifact.exists()
    assert finished_experiment.source_model().absolute_path().exists()


def test_stop_a_queued_experiment_stops_it_at_once(client, ready_experiment):
    client.post(f"/api/experiments/{ready_experiment.pk}/start")

    response = client.post(f"/api/experiments/{ready_experiment.pk}/stop")

    assert response.status_code == 202
    assert response.json()["status"] == "stopped"
    ready_experiment.refresh_from_db()
    assert ready_experiment.status == "stopped"


def test_stop_a_running_experiment_asks_the_worker(client, ready_experiment):
    ready_experiment.enqueue()
    ready_experiment.mark_running()

    response = client.post(f"/api/experiments/{ready_experiment.pk}/stop")

    assert response.status_code == 202
    assert response.json()["status"] == "stopping"
    ready_experiment.refresh_from_db()
    assert ready_experiment.stop_requested and ready_experiment.status == "running"


def test_stop_when_not_running_returns_409(client, ready_experiment):
    response = client.post(f"/api/experiments/{ready_experiment.pk}/stop")

    assert response.status_code == 409


def test_results_list_runs_with_artifacts_and_baseline(client, finished_experiment):
    body = client.get(f"/api/experiments/{finished_experiment.pk}/results").json()

    assert body["status"] == "completed"
    assert body["baseline"]["size_bytes"] == 4000
    assert "artifacts" not in body["baseline"]
    [run] = body["runs"]
    assert run["technique"] == "ptq_int8"
    assert run["artifacts"] == ["native", "onnx"]
    assert run["constraints_met"] == {"max_accuracy_drop": True}
    assert run["estimates"]["device"] == "rpi4"


def test_recommendation_before_the_end_returns_409(client, ready_experiment):
    response = client.get(f"/api/experiments/{ready_experiment.pk}/recommendation")

    assert response.status_code == 409


def test_recommendation_after_the_end_gives_technique_and_reasoning(client, finished_experiment):
    body = client.get(f"/api/experiments/{finished_experiment.pk}/recommendation").json()

    assert body["technique"] == "ptq_int8"
    assert "3.6x" in body["reasoning"]
    assert body["satisfied"] is True


def test_download_serves_the_deploy_artifact_as_attachment(client, finished_experiment):
    response = client.get(f"/api/experiments/{finished_experiment.pk}/download/ptq_int8")

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"\x08\x07onnx-bytes"
    assert "attachment" in response["Content-Disposition"]
    assert ".onnx" in response["Content-Disposition"]


def test_download_native_format_serves_the_framework_file(client, finished_experiment):
    response = client.get(f"/api/experiments/{finished_experiment.pk}/download/ptq_int8?format=native")

    assert b"".join(response.streaming_content) == b"PK\x03\x04native"


def test_download_baseline_serves_the_original_model(client, finished_experiment, pretrained_model):
    response = client.get(f"/api/experiments/{finished_experiment.pk}/download/baseline")

    assert b"".join(response.streaming_content) == pretrained_model.read_bytes()


def test_download_of_a_technique_that_did_not_run_returns_404(client, finished_experiment):
    response = client.get(f"/api/experiments/{finished_experiment.pk}/download/qat")

    assert response.status_code == 404


@pytest.mark.parametrize("technique", [
    "magic",
    "../../settings.py",
    "..%2F..%2Fsettings.py",
    "%2e%2e/%2e%2e/edgeopt_site/settings.py",
    "ptq_int8/../../../../edgeopt_site/settings.py",
])
def test_download_of_unknown_technique_or_path_returns_404_and_reads_nothing(
        client, finished_experiment, technique, monkeypatch):
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))

    response = client.get(f"/api/experiments/{finished_experiment.pk}/download/{technique}")

    assert response.status_code == 404
    assert "error" in response.json()
    assert not any("settings.py" in path for path in opened)


def test_delete_removes_rows_and_stored_files(client, finished_experiment, storage_root, pretrained_model):
    experiment_id = finished_experiment.pk
    output_dir = storage_root / "models" / "optimized" / str(experiment_id)
    assert output_dir.exists()

    response = client.delete(f"/api/experiments/{experiment_id}")

    assert response.status_code == 204
    assert not Experiment.objects.filter(pk=experiment_id).exists()
    assert not ModelFile.objects.filter(experiment_id=experiment_id).exists()
    assert not OptimizationRun.objects.filter(experiment_id=experiment_id).exists()
    assert not output_dir.exists()
    assert pretrained_model.exists(), "the shared pretrained model must survive"


def test_delete_while_running_returns_409(client, ready_experiment):
    ready_experiment.enqueue()

    response = client.delete(f"/api/experiments/{ready_experiment.pk}")

    assert response.status_code == 409
    assert Experiment.objects.filter(pk=ready_experiment.pk).exists()


def test_delete_when_storage_refuses_answers_503_and_keeps_the_rows(client, finished_experiment, monkeypatch):
    from experiments import storage

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(storage.shutil, "rmtree", refuse)  # tests run as root: chmod would not stop them

    response = client.delete(f"/api/experiments/{finished_experiment.pk}")

    assert response.status_code == 503
    assert "/tmp" not in response.json()["error"] and "/work" not in response.json()["error"]
    assert Experiment.objects.filter(pk=finished_experiment.pk).exists()
    assert OptimizationRun.objects.filter(experiment=finished_experiment).exists()
