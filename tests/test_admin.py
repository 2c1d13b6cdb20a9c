"""The admin lists the five tables and stops experiments."""
from __future__ import annotations

import pytest

from experiments.models import Experiment

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("table", ["experiment", "optimizationrun", "modelfile", "recommendation",
                                   "experimentprogress"])
def test_admin_lists_each_table(admin_client, finished_experiment, table):
    response = admin_client.get(f"/admin/experiments/{table}/")

    assert response.status_code == 200


def test_admin_experiment_page_shows_runs_and_files_inline(admin_client, finished_experiment):
    page = admin_client.get(f"/admin/experiments/experiment/{finished_experiment.pk}/change/").content.decode()

    assert "ptq_int8" in page
    assert f"models/optimized/{finished_experiment.pk}/ptq_int8.onnx" in page


def test_admin_action_stops_running_experiments(admin_client, ready_experiment):
    ready_experiment.enqueue()
    ready_experiment.mark_running()

    admin_client.post("/admin/experiments/experiment/", {
        "action": "stop_experiments", "_selected_action": [ready_experiment.pk]})

    assert Experiment.objects.get(pk=ready_experiment.pk).stop_requested


def test_admin_requires_login(client):
    assert client.get("/admin/experiments/experiment/").status_code == 302
