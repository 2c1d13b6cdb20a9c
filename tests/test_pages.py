"""The HTMX pages: setup creates and starts, monitor and results render the state."""
from __future__ import annotations

import pytest
from django_q.models import OrmQ

from experiments.models import Experiment
from tests.conftest import upload_file

pytestmark = pytest.mark.django_db

SETUP = {"name": "from the page", "framework": "pytorch", "target_device": "rpi5", "dataset": "digits",
         "goal": "min_size", "max_accuracy_drop": "1.5", "max_size_mb": "", "techniques": ["ptq_int8", "qat"],
         "epochs": "1"}


def test_setup_page_lists_presets_pretrained_models_and_past_experiments(client, ready_experiment):
    page = client.get("/").content.decode()

    assert 'value="digits"' in page
    assert 'value="digits_cnn"' in page
    assert ready_experiment.name in page
    assert "hx-ws" in page, "htmx's ws extension is loaded"
    assert "X-CSRFToken" in page


def test_setup_form_with_pretrained_model_creates_starts_and_redirects_to_monitor(
        client, pretrained_model, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/", {**SETUP, "pretrained_model": "digits_cnn"})

    experiment = Experiment.objects.get(name="from the page")
    assert response.status_code == 302
    assert response["Location"] == f"/experiments/{experiment.pk}/"
    assert experiment.status == "queued"
    assert experiment.techniques == ["ptq_int8", "qat"]
    assert experiment.constraints == {"max_accuracy_drop": 1.5}
    assert experiment.config["techniques"]["qat"] == {"epochs": 1}
    assert OrmQ.objects.count() == 1


def test_setup_form_with_an_uploaded_model_stores_it(client, model_files):
    response = client.post("/", {**SETUP, "model_file": upload_file(model_files["pt"]), "input_shape": "1,8,8"})

    experiment = Experiment.objects.get(name="from the page")
    assert response.status_code == 302
    assert experiment.source_model().role == "upload"


def test_invalid_setup_form_shows_messages_and_creates_nothing(client):
    response = client.post("/", {**SETUP, "name": "", "max_accuracy_drop": "-3"})

    page = response.content.decode()
    assert response.status_code == 400
    assert "This field is required" in page
    assert "upload a model or pick a pretrained one" in page
    assert "greater than or equal to 0" in page
    assert not Experiment.objects.exists()


def test_setup_with_a_refused_upload_shows_why_and_creates_nothing(client, model_files, storage_root):
    response = client.post("/", {**SETUP, "model_file": upload_file(model_files["trojan"], "model.pth"),
                                    "architecture": "digits_cnn"})

    assert response.status_code == 400
    assert "arbitrary code" in response.content.decode()
    assert not Experiment.objects.exists()
    assert not list((storage_root / "models" / ".incoming").iterdir())


def test_monitor_page_renders_the_progress_partial_and_connects_the_socket(client, ready_experiment):
    ready_experiment.enqueue()

    page = client.get(f"/experiments/{ready_experiment.pk}/").content.decode()

    assert f'ws-connect="/ws/experiments/{ready_experiment.pk}?format=html"' in page
    assert 'id="progress-panel"' in page
    assert page.count('class="bar-row technique') == 7
    assert "Stop" in page


def test_stop_button_with_htmx_returns_the_panel(client, ready_experiment):
    ready_experiment.enqueue()

    response = client.post(f"/experiments/{ready_experiment.pk}/stop", HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    assert 'id="progress-panel"' in response.content.decode()
    ready_experiment.refresh_from_db()
    assert ready_experiment.status == "stopped"


def test_results_page_shows_runs_estimates_constraints_recommendation_and_downloads(
        client, finished_experiment):
    page = client.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "Recommendation: ptq_int8" in page
    assert "3.6x smaller" in page
    assert "estimated" in page
    assert "max_accuracy_drop ≤ 1.0: pass" in page
    assert f"/api/experiments/{finished_experiment.pk}/download/ptq_int8?format=native" in page
    assert "baseline (FP32)" in page


def test_results_page_shows_the_model_analysis_and_how_estimates_are_made(client, finished_experiment):
    from experiments.sink import DjangoSink

    sink = DjangoSink(finished_experiment)
    sink.analysis({"params": 650, "macs": 640, "input_shape": [1, 8, 8], "peak_activation_bytes": 2048,
                   "layers": [{"name": "fc", "type": "fc", "params": 650, "macs": 640, "output_shape": [1, 10],
                               "activation_bytes": 40}],
                   "bottlenecks": [{"layer": "fc", "type": "fc", "reason": "100% of the model's parameters"}]})
    baseline = {**finished_experiment.baseline}
    baseline["estimates"] = {**baseline["estimates"], "assumptions": ["energy = latency x board power 6.4 W"]}
    finished_experiment.baseline = baseline
    finished_experiment.save(update_fields=["baseline"])

    page = client.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "Model analysis" in page
    assert "100% of the model&#x27;s parameters" in page
    assert "energy = latency x board power 6.4 W" in page


def test_monitor_of_unknown_experiment_is_404(client):
    assert client.get("/experiments/99999/").status_code == 404


def test_chart_marks_only_undominated_results_as_the_pareto_front():
    from experiments.models import OptimizationRun
    from experiments.views import accuracy_size_chart

    runs = [OptimizationRun(technique="ptq_int8", status="completed", accuracy=0.94, size_bytes=1100),
            OptimizationRun(technique="prune_structured", status="completed", accuracy=0.90, size_bytes=3000),
            OptimizationRun(technique="qat", status="failed")]

    chart = accuracy_size_chart({"accuracy": 0.95, "size_bytes": 4000}, runs)

    front = {p["label"]: p["front"] for p in chart["points"]}
    assert front == {"baseline": True, "ptq_int8": True, "prune_structured": False}


def test_results_page_draws_the_chart(client, finished_experiment):
    page = client.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "<svg" in page and 'class="front"' in page
