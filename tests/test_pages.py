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


def test_setup_page_lists_presets_and_pretrained_models_and_links_past_experiments(client, ready_experiment):
    page = client.get("/").content.decode()

    assert 'value="digits"' in page
    assert 'value="digits_cnn"' in page
    assert 'href="/experiments/"' in page
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
    assert page.count('class="bar-row technique') == 8, "the baseline and seven techniques"
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

    assert "Recommended: ptq_int8" in page
    assert "3.6x smaller" in page
    assert "estimated" in page
    assert "max_accuracy_drop ≤ 1.0: pass" in page
    assert f"/api/experiments/{finished_experiment.pk}/download/ptq_int8?format=native" in page
    assert f"/api/experiments/{finished_experiment.pk}/bundle/ptq_int8" in page
    assert "int8 ONNX (deploy)" in page and "float .pt2 (native)" in page


def test_results_page_shows_the_model_analysis_and_how_estimates_are_made(client, finished_experiment):
    finished_experiment.analysis = {"params": 650, "macs": 640, "input_shape": [1, 8, 8], "peak_activation_bytes": 2048,
                   "layers": [{"name": "fc", "type": "fc", "params": 650, "macs": 640, "output_shape": [1, 10],
                               "activation_bytes": 40}],
                   "bottlenecks": [{"layer": "fc", "type": "fc", "reason": "100% of the model's parameters"}]}
    baseline = {**finished_experiment.baseline}
    baseline["estimates"] = {**baseline["estimates"], "assumptions": ["energy = latency x board power 6.4 W"]}
    finished_experiment.baseline = baseline
    finished_experiment.save(update_fields=["baseline", "analysis"])

    page = client.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "Model analysis" in page
    assert "100% of the model&#x27;s parameters" in page
    assert "energy = latency x board power 6.4 W" in page


def test_monitor_of_unknown_experiment_is_404(client):
    assert client.get("/experiments/99999/").status_code == 404


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


def test_results_page_draws_the_chart_with_the_vendored_library_and_an_axis_selector(client, finished_experiment):
    page = client.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert 'id="chart-data"' in page and 'id="results-chart"' in page
    assert "vendor/chartjs/chart.umd.min.js" in page
    for axis in ("Download size (KB)", "Host latency, measured (ms)", "Device latency, estimated (ms)",
                 "Energy per inference, estimated (mJ)"):
        assert axis in page


# -- the experiments list, run again, resume ------------------------------------------------------


def stopped_experiment(ready_experiment):
    """ptq_int8 finished, qat stopped by the user, the rest never started."""
    from experiments.attempts import claim
    from experiments.sink import DjangoSink

    experiment = ready_experiment
    experiment.enqueue()
    sink = DjangoSink(experiment, claim(experiment.pk))
    sink.output_dir.mkdir(parents=True)
    (sink.output_dir / "ptq_int8.onnx").write_bytes(b"\x08\x07onnx")
    sink.baseline({"accuracy": 0.95, "size_bytes": 4000, "latency_ms": 0.05, "estimates": {}})
    sink.run_started("ptq_int8")
    sink.run_finished("ptq_int8", {"status": "completed", "accuracy": 0.94, "accuracy_drop": 1.0, "size_bytes": 1100,
                                   "compression_ratio": 3.6, "latency_ms": 0.03, "speedup": 1.7, "details": {"bits": 8},
                                   "artifacts": {"deploy": sink.output_dir / "ptq_int8.onnx"}})
    sink.run_started("qat")
    sink.run_finished("qat", {"status": "stopped", "error": "stopped by the user"})
    experiment.refresh_from_db()
    experiment.finish(Experiment.Status.STOPPED)
    return experiment


def test_experiments_list_shows_status_model_best_result_when_and_actions(client, finished_experiment):
    page = client.get("/experiments/").content.decode()

    assert finished_experiment.name in page
    assert "completed" in page and "digits_cnn.pt" in page
    assert "ptq_int8: 94.00%, 3.60× smaller" in page
    assert f'action="/experiments/{finished_experiment.pk}/rerun"' in page
    assert f'action="/experiments/{finished_experiment.pk}/resume"' not in page, "nothing to resume"


def test_run_again_makes_a_new_experiment_with_the_same_settings_and_starts_it(
        client, finished_experiment, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/experiments/{finished_experiment.pk}/rerun")

    clone = Experiment.objects.exclude(pk=finished_experiment.pk).get()
    assert response.status_code == 302 and response["Location"] == f"/experiments/{clone.pk}/"
    assert clone.status == "queued"
    for name in ("name", "framework", "target_device", "dataset", "goal", "constraints", "techniques", "config",
                 "plan", "time_budget_s"):
        assert getattr(clone, name) == getattr(finished_experiment, name)
    assert clone.source_model().path == finished_experiment.source_model().path, "a pretrained model is shared"
    assert finished_experiment.runs.count() == 1, "the original keeps its results"


def test_run_again_copies_an_uploaded_model_so_each_experiment_owns_its_file(client, model_files, storage_root):
    from experiments import services

    client.post("/", {**SETUP, "model_file": upload_file(model_files["pt"]), "input_shape": "1,8,8"})
    original = Experiment.objects.get()
    Experiment.objects.filter(pk=original.pk).update(status="stopped")

    client.post(f"/experiments/{original.pk}/rerun")

    clone = Experiment.objects.exclude(pk=original.pk).get()
    assert clone.source_model().path != original.source_model().path
    assert clone.source_model().absolute_path().read_bytes() == model_files["pt"].read_bytes()
    services.delete_experiment(Experiment.objects.get(pk=original.pk))
    assert clone.source_model().absolute_path().is_file(), "deleting one experiment keeps the other's model"


def test_resume_keeps_finished_runs_and_queues_the_rest(client, ready_experiment, django_capture_on_commit_callbacks):
    experiment = stopped_experiment(ready_experiment)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/experiments/{experiment.pk}/resume")

    experiment.refresh_from_db()
    assert response.status_code == 302 and experiment.status == "queued"
    assert list(experiment.runs.values_list("technique", "status")) == [("ptq_int8", "completed")]
    assert experiment.files.filter(technique="ptq_int8").exists()
    assert experiment.baseline["accuracy"] == 0.95
    assert OrmQ.objects.count() == 1


def test_resume_of_a_completed_experiment_says_why_not(client, finished_experiment):
    response = client.post(f"/experiments/{finished_experiment.pk}/resume", follow=True)

    assert "Could not resume" in response.content.decode()
    finished_experiment.refresh_from_db()
    assert finished_experiment.status == "completed"


# -- stopped and failed runs read well -------------------------------------------------------------


def test_a_stopped_experiment_has_no_pending_rows_no_zero_bytes_and_says_what_did_not_run(
        client, ready_experiment):
    experiment = stopped_experiment(ready_experiment)

    results = client.get(f"/experiments/{experiment.pk}/results/").content.decode()
    monitor = client.get(f"/experiments/{experiment.pk}/").content.decode()

    assert "pending" not in results and "0 bytes" not in results
    assert "No recommendation</h2>" in results and "stopped before every technique ran" in results
    assert "Not run: ptq_int4, prune_unstructured, prune_structured, distillation, hybrid" in results
    assert f'action="/experiments/{experiment.pk}/resume"' in results
    assert "pending" not in monitor and monitor.count("not run") == 5


def test_a_failed_experiment_shows_its_error_once_without_the_exception_name(client, ready_experiment):
    ready_experiment.enqueue()
    ready_experiment.mark_running()
    ready_experiment.finish(Experiment.Status.FAILED, error="ValueError: the model expects inputs of shape [1, 28, 28]")

    for url in (f"/experiments/{ready_experiment.pk}/", f"/experiments/{ready_experiment.pk}/results/"):
        page = client.get(url).content.decode()
        assert page.count("the model expects inputs of shape") == 1, url
        assert "ValueError" not in page


def test_a_recommendation_that_meets_nothing_is_a_warning_in_parts_not_a_green_heading(
        client, finished_experiment):
    from experiments.models import Recommendation

    Recommendation.objects.filter(experiment=finished_experiment).update(
        satisfied=False, reasoning="Goal: balanced. No technique meets every constraint. ptq_int8 comes closest: "
                                   "3.6x smaller, but max_size_mb is 1.1 MB over 1.0 MB. qat: failed.")

    page = client.get(f"/experiments/{finished_experiment.pk}/results/").content.decode()

    assert "Recommended:" not in page
    assert "No technique meets every constraint</h2>" in page and 'class="recommendation warn"' in page
    assert "<li>ptq_int8 comes closest: 3.6x smaller, but max_size_mb is 1.1 MB over 1.0 MB.</li>" in page


# -- the results page says what each run did, with spreads ------------------------------------------


def test_results_page_describes_runs_in_words_with_spreads_noise_and_layers(client, finished_experiment):
    from experiments.models import OptimizationRun

    OptimizationRun.objects.filter(experiment=finished_experiment, technique="ptq_int8").update(
        latency_ms=0.045, latency_ms_low=0.043, latency_ms_high=0.052, speedup=1.11, speedup_low=0.96,
        speedup_high=1.2, speedup_within_noise=True,
        details={"bits": 8, "calibration_samples": 128, "kept_wider": {"fc": "too few weights to gain"},
                 "native": "FP32 .pt2: the quantized model exists only as ONNX",
                 "analysis": {"layers": [{"name": "fc_quant", "type": "fc", "params": 650, "macs": 640,
                                          "precision": "int8"}]}})
    finished_experiment.baseline = {**finished_experiment.baseline, "latency_ms": 0.05, "latency_ms_low": 0.048,
                                    "latency_ms_high": 0.06, "accuracy_n": 359}
    finished_experiment.analysis = {"layers": [{"name": "fc", "type": "fc", "params": 650, "macs": 640,
                                                "precision": "fp32"}]}
    finished_experiment.save()

    page = client.get(f"/experiments/{finished_experiment.pk}/results/?layers=ptq_int8").content.decode()

    assert "Weights stored in 8 bits." in page
    assert "Ranges calibrated on 128 training samples." in page
    assert "1 layer kept at higher precision: too few weights to gain." in page
    assert "45.0 µs" in page and "50.0 µs" in page, "microsecond latencies in µs, three digits"
    assert "(359 samples; ± is a 95% interval)" in page and "91.0%–96.0%" in page
    assert "within noise" in page and "0.96×–1.20×" in page, "the speedup's range includes 1"
    assert "fc_quant" in page and "Layers of ptq_int8" in page, "the selected run's layers beside the baseline's"
    assert "Ranking scores" in page


def test_two_results_side_by_side(client, finished_experiment):
    from experiments.models import OptimizationRun

    OptimizationRun.objects.create(experiment=finished_experiment, technique="qat", status="completed", accuracy=0.96,
                                   accuracy_drop=-1.0, size_bytes=1200, compression_ratio=3.3, latency_ms=0.31,
                                   speedup=1.6, details={"epochs": 2})

    page = client.get(f"/experiments/{finished_experiment.pk}/results/?compare=qat&compare=ptq_int8").content.decode()

    assert "Compare two results" in page
    assert "<th scope=\"col\">qat</th><th scope=\"col\">ptq_int8</th>" in page
    assert "Fine-tuned for 2 epochs." in page


def test_number_formats_and_intervals():
    from experiments.presenters import reasoning_parts, wilson_interval
    from experiments.templatetags.edgeopt import duration_ms, plain_error, size_bytes

    assert duration_ms(0.0453) == "45.3 µs" and duration_ms(3.2) == "3.20 ms" and duration_ms(1520) == "1.52 s"
    assert size_bytes(None) == "—" and size_bytes(368640) == "360 KB"
    assert plain_error("ValueError: bad shape") == "bad shape"
    low, high = wilson_interval(0.5, 100)
    assert round(low, 3) == 0.404 and round(high, 3) == 0.596
    assert reasoning_parts("Goal: smallest. Ranked by size. ptq_int4 is recommended: 6.2x smaller.") == [
        "Goal: smallest.", "Ranked by size.", "ptq_int4 is recommended: 6.2x smaller."]


# -- accessible and usable without JavaScript ------------------------------------------------------


def test_monitor_has_a_real_stop_form_a_live_region_labelled_bars_and_a_no_javascript_fallback(
        client, ready_experiment):
    import re

    ready_experiment.enqueue()

    page = client.get(f"/experiments/{ready_experiment.pk}/").content.decode()

    stop_form = re.search(r'<form method="post" action="/experiments/\d+/stop"[^>]*>.*?</form>', page, re.S).group(0)
    assert "csrfmiddlewaretoken" in stop_form and 'type="submit"' in stop_form
    assert 'role="status" aria-live="polite"' in page
    bars = re.findall(r'<progress id="([\w-]+)"', page)
    assert len(bars) == 9, "overall, baseline and seven techniques"
    for bar in bars:
        assert f'<label for="{bar}">' in page, bar
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    assert "reloads itself every 5 seconds" in page


def test_live_updates_leave_the_stop_button_in_place_and_announce_only_the_step(client, ready_experiment):
    from experiments.models import ExperimentProgress
    from experiments.views import render_progress

    ready_experiment.enqueue()
    ready_experiment.mark_running()
    ExperimentProgress.publish(ready_experiment, technique="qat", technique_index=6, technique_count=7,
                               technique_progress=0.4, overall_progress=0.7, eta_seconds=30.0,
                               message="fine-tuning epoch 1/2", metrics={"loss": 0.25, "epoch": 1},
                               steps=[{"technique": "baseline", "estimate_s": 5.0}])

    running = render_progress(ready_experiment)

    assert 'id="stop-area"' not in running, "the Stop button (and its focus) is left alone"
    assert '<div id="announcer" hx-swap-oob="innerHTML">' in running
    assert "Running step 7 of 8: qat" in running
    assert "about 30 s left" in running and "fine-tuning epoch 1/2" in running
    assert '"loss": 0.25' in running, "the loss curve's data travels with the panel"

    ready_experiment.finish("stopped")
    stopped = render_progress(ready_experiment)

    assert '<div id="stop-area" hx-swap-oob="true">' in stopped and "See the results" in stopped


# -- the setup form -------------------------------------------------------------------------------


def test_a_new_user_finds_the_demo_preselected_and_models_grouped_by_framework(client, pretrained_model):
    page = client.get("/").content.decode()

    assert '<option value="digits_cnn" selected>digits_cnn</option>' in page
    assert '<optgroup label="PyTorch" data-framework="pytorch">' in page
    assert 'data-show-if="pretrained_model="' in page and 'data-show-if="dataset=custom"' in page
    assert "js/setup.js" in page
    assert page.count('name="techniques"') == 7 and page.count(" checked>") >= 7
    assert "Static INT8 quantization calibrated on sample inputs; no training. Cost: seconds." in page
    assert 'data-show-if="fine_tunes"' in page, "the epochs budget shows only with a fine-tune ticked"


def test_a_refused_setup_lists_every_problem_at_the_top_with_links(client):
    response = client.post("/", {**SETUP, "name": "", "max_size_mb": "1e400"})

    page = response.content.decode()
    summary = page[page.index('id="error-summary"'):page.index("</div>", page.index('id="error-summary"'))]
    assert response.status_code == 400
    assert "things to fix" in summary
    assert 'href="#id_name"' in summary and 'href="#id_max_size_mb"' in summary
    assert "max size (MB): enter a finite number" in summary
    assert 'name="max_size_mb" value="1e400" inputmode="decimal"' in page, "what was typed stays, as text"


def test_another_users_experiment_cannot_be_run_again_or_resumed(other_client, finished_experiment):
    assert other_client.post(f"/experiments/{finished_experiment.pk}/rerun").status_code == 404
    assert other_client.post(f"/experiments/{finished_experiment.pk}/resume").status_code == 404
    assert finished_experiment.name not in other_client.get("/experiments/").content.decode()
    assert Experiment.objects.count() == 1
