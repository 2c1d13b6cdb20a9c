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


def test_setup_page_lists_presets_and_pretrained_models_and_links_past_experiments(anonymous, ready_experiment):
    page = anonymous.get("/").content.decode()

    assert 'value="digits"' in page
    assert 'value="digits_cnn"' in page
    assert 'href="/experiments/"' in page
    assert "hx-ws" in page, "htmx's ws extension is loaded"
    assert "X-CSRFToken" in page


def test_setup_form_with_pretrained_model_creates_starts_and_redirects_to_monitor(
        anonymous, pretrained_model, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = anonymous.post("/", {**SETUP, "pretrained_model": "digits_cnn"})

    experiment = Experiment.objects.get(name="from the page")
    assert response.status_code == 302
    assert response["Location"] == f"/experiments/{experiment.pk}/"
    assert experiment.status == "queued"
    assert experiment.techniques == ["ptq_int8", "qat"]
    assert experiment.constraints == {"max_accuracy_drop": 1.5}
    assert experiment.config["techniques"]["qat"] == {"epochs": 1}
    assert OrmQ.objects.count() == 1


def test_setup_form_with_an_uploaded_model_stores_it(anonymous, model_files):
    response = anonymous.post("/", {**SETUP, "model_file": upload_file(model_files["pt"])})

    experiment = Experiment.objects.get(name="from the page")
    assert response.status_code == 302
    assert experiment.source_model().role == "upload"


def test_invalid_setup_form_shows_messages_and_creates_nothing(anonymous):
    response = anonymous.post("/", {**SETUP, "name": "", "max_accuracy_drop": "-3"})

    page = response.content.decode()
    assert response.status_code == 400
    assert "This field is required" in page
    assert "upload a model or pick a pretrained one" in page
    assert "greater than or equal to 0" in page
    assert not Experiment.objects.exists()


def test_setup_with_a_refused_upload_shows_why_and_creates_nothing(anonymous, model_files, storage_root):
    response = anonymous.post("/", {**SETUP, "model_file": upload_file(model_files["trojan"], "model.pth"),
                                    "architecture": "digits_cnn"})

    assert response.status_code == 400
    assert "arbitrary code" in response.content.decode()
    assert not Experiment.objects.exists()
    assert not list((storage_root / "models" / ".incoming").iterdir())


def test_monitor_page_renders_the_progress_partial_and_connects_the_socket(anonymous, ready_experiment):
    ready_experiment.enqueue()

    page = anonymous.get(f"/experiments/{ready_experiment.pk}/").content.decode()

    assert f'ws-connect="/ws/experiments/{ready_experiment.pk}?format=html"' in page
    assert 'id="progress-panel"' in page
    assert page.count('class="bar-row technique') == 8, "the baseline and seven techniques"
    assert "Stop" in page


def test_stop_button_with_htmx_returns_the_panel(anonymous, ready_experiment):
    ready_experiment.enqueue()

    response = anonymous.post(f"/experiments/{ready_experiment.pk}/stop", HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    assert 'id="progress-panel"' in response.content.decode()
    ready_experiment.refresh_from_db()
    assert ready_experiment.status == "stopped"


def test_results_page_shows_runs_estimates_constraints_recommendation_and_downloads(
        anonymous, finished_experiment):
    page = anonymous.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "Recommended: ptq_int8" in page
    assert "3.6x smaller" in page
    assert "estimated" in page
    assert "max_accuracy_drop ≤ 1.0: pass" in page
    assert f"/api/experiments/{finished_experiment.pk}/download/ptq_int8?format=native" in page
    assert f"/api/experiments/{finished_experiment.pk}/bundle/ptq_int8" in page
    assert "int8 ONNX (deploy)" in page and "float .pt2 (native)" in page


def test_results_page_shows_the_model_analysis_and_how_estimates_are_made(anonymous, finished_experiment):
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

    page = anonymous.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "Model analysis" in page
    assert "100% of the model&#x27;s parameters" in page
    assert "energy = latency x board power 6.4 W" in page


def test_monitor_of_unknown_experiment_is_404(anonymous):
    assert anonymous.get("/experiments/99999/").status_code == 404


def test_chart_marks_only_undominated_results_as_the_pareto_front_on_each_axis():
    from experiments.presenters import chart_data

    runs = [{"technique": "ptq_int8", "status": "completed", "accuracy": 0.94, "size_bytes": 1100, "latency_ms": 0.4,
             "estimates": {"latency_ms": 2.0, "energy_mj": 1.0}},
            {"technique": "prune_structured", "status": "completed", "accuracy": 0.90, "size_bytes": 3000,
             "latency_ms": 0.1, "estimates": {"latency_ms": 1.0, "energy_mj": 0.5}},
            {"technique": "qat", "status": "failed"}]
    baseline = {"accuracy": 0.95, "size_bytes": 4000, "latency_ms": 0.5, "estimates": {"latency_ms": 3.0, "energy_mj": 2.0}}

    chart = chart_data(baseline, runs, {"max_size_mb": 1, "max_accuracy_drop": 2.0}, "ptq_int8")

    assert chart["fronts"]["size"] == ["ptq_int8", "baseline"]
    assert chart["fronts"]["host_latency"] == ["prune_structured", "ptq_int8", "baseline"]
    assert [p["label"] for p in chart["points"]] == ["baseline", "ptq_int8", "prune_structured"]
    assert chart["limits"] == {"size": 1024.0, "accuracy": 93.0}
    assert chart["recommended"] == "ptq_int8"


def test_results_page_draws_the_chart_with_the_vendored_library_and_an_axis_selector(anonymous, finished_experiment):
    page = anonymous.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert 'id="chart-data"' in page and 'id="results-chart"' in page
    assert "vendor/chartjs/chart.umd.min.js" in page
    for axis in ("Download size (KB)", "Host latency, measured (ms)", "Device latency, estimated (ms)",
                 "Energy per inference, estimated (mJ)"):
        assert axis in page
