"""The admin lists the tables (staff see every user's experiments), stops experiments, keeps
finished and active ones read-only and deletes like the API."""
from __future__ import annotations

import pytest

from experiments.models import Experiment

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("table", ["experiment", "optimizationrun", "modelfile", "recommendation",
                                   "experimentprogress", "apitoken"])
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


def test_admin_requires_login(anonymous):
    assert anonymous.get("/admin/experiments/experiment/").status_code == 302


def test_admin_is_closed_to_a_logged_in_user_who_is_not_staff(client):
    assert client.get("/admin/experiments/experiment/").status_code == 302


def test_admin_cannot_delete_a_running_experiment(admin_client, ready_experiment):
    ready_experiment.enqueue()
    ready_experiment.mark_running()

    page = admin_client.get(f"/admin/experiments/experiment/{ready_experiment.pk}/delete/")
    admin_client.post("/admin/experiments/experiment/", {
        "action": "delete_selected", "_selected_action": [ready_experiment.pk], "post": "yes"})

    assert page.status_code == 403
    assert Experiment.objects.filter(pk=ready_experiment.pk).exists()


def test_admin_delete_removes_the_stored_files_like_the_api(admin_client, finished_experiment, storage_root):
    output = storage_root / "models" / "optimized" / str(finished_experiment.pk)
    assert (output / "ptq_int8.onnx").exists()

    response = admin_client.post(f"/admin/experiments/experiment/{finished_experiment.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302
    assert not Experiment.objects.filter(pk=finished_experiment.pk).exists()
    assert not output.exists()


def test_admin_bulk_delete_removes_the_stored_files(admin_client, finished_experiment, storage_root):
    output = storage_root / "models" / "optimized" / str(finished_experiment.pk)

    admin_client.post("/admin/experiments/experiment/", {
        "action": "delete_selected", "_selected_action": [finished_experiment.pk], "post": "yes"})

    assert not Experiment.objects.filter(pk=finished_experiment.pk).exists()
    assert not output.exists()


def test_admin_lists_every_users_experiments_with_their_owner(admin_client, finished_experiment, new_experiment,
                                                              other_user):
    others = new_experiment(owned_by=other_user, name="the other users experiment")

    page = admin_client.get("/admin/experiments/experiment/").content.decode()

    assert finished_experiment.name in page and others.name in page
    assert ">other<" in page and ">owner<" in page


def test_admin_links_only_the_viewers_own_experiments_to_their_results_page(
        admin_client, admin_user, finished_experiment, new_experiment):
    own = new_experiment(owned_by=admin_user, name="the admins own")

    page = admin_client.get("/admin/experiments/experiment/").content.decode()

    assert f'href="/experiments/{own.pk}/results/"' in page
    # Another user's results page answers 404 to staff too, so it is not linked.
    assert f'href="/experiments/{finished_experiment.pk}/results/"' not in page


def test_staff_can_revoke_a_users_token_in_the_admin(admin_client, anonymous, owner):
    from experiments.models import ApiToken

    row, token = ApiToken.issue(owner, "leaked")
    listed = admin_client.get("/admin/experiments/apitoken/").content.decode()

    admin_client.post(f"/admin/experiments/apitoken/{row.pk}/delete/", {"post": "yes"})

    assert "leaked" in listed and token not in listed
    assert anonymous.get("/api/experiments", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_admin_shows_a_finished_experiment_read_only(admin_client, finished_experiment):
    url = f"/admin/experiments/experiment/{finished_experiment.pk}/change/"
    page = admin_client.get(url).content.decode()

    response = admin_client.post(url, {"name": "renamed", "framework": "pytorch", "target_device": "rpi4",
                                       "dataset": "digits", "goal": "balanced"})

    assert 'name="_save"' not in page
    assert response.status_code == 403
    assert Experiment.objects.get(pk=finished_experiment.pk).name == finished_experiment.name


def test_admin_page_of_a_running_experiment_offers_stop_instead_of_edit_or_delete(admin_client, ready_experiment):
    ready_experiment.enqueue()
    ready_experiment.mark_running()
    page = admin_client.get(f"/admin/experiments/experiment/{ready_experiment.pk}/change/").content.decode()
    stop_url = f"/admin/experiments/experiment/{ready_experiment.pk}/stop/"

    response = admin_client.post(stop_url)

    assert stop_url in page and 'name="_save"' not in page and "/delete/" not in page
    assert response.status_code == 302
    assert Experiment.objects.get(pk=ready_experiment.pk).stop_requested
