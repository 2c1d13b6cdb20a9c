"""Who may call the JSON API: the owner (by session or token) sees their experiments, another
user gets 404 for them on every endpoint, nobody gets 401, a session needs the CSRF token to
change anything, and the per-user quotas answer 429 / 413."""
from __future__ import annotations

import json

import pytest
from django.test import Client

from experiments.models import ApiToken, Experiment, ModelFile
from tests.conftest import DEMO_BODY, npz_bytes
from tests.test_api import ENDPOINTS

pytestmark = pytest.mark.django_db


def post_json(client, url, body, **extra):
    return client.post(url, data=json.dumps(body), content_type="application/json", **extra)


# -- another user's experiment -------------------------------------------------------------


@pytest.mark.parametrize("method, url", ENDPOINTS)
def test_another_users_experiment_is_404_on_every_endpoint_and_is_left_alone(
        other_client, finished_experiment, method, url):
    response = getattr(other_client, method)(url.format(id=finished_experiment.pk))

    assert response.status_code == 404
    assert response.json()["error"] == f"experiment {finished_experiment.pk} does not exist"
    assert Experiment.objects.get(pk=finished_experiment.pk).status == "completed"
    assert finished_experiment.files.count() == 4


def test_another_users_experiment_answers_like_one_that_does_not_exist(other_client, finished_experiment):
    """The 404 must not tell that the experiment exists."""
    theirs = other_client.get(f"/api/experiments/{finished_experiment.pk}").json()["error"]
    missing = other_client.get("/api/experiments/987654").json()["error"]

    assert theirs.replace(str(finished_experiment.pk), "N") == missing.replace("987654", "N")


def test_the_list_shows_only_the_users_own_experiments(client, other_client, finished_experiment, new_experiment,
                                                       other_user):
    theirs = new_experiment(owned_by=other_user, name="theirs")

    mine = [e["id"] for e in client.get("/api/experiments").json()["experiments"]]
    others = [e["id"] for e in other_client.get("/api/experiments").json()["experiments"]]

    assert mine == [finished_experiment.pk]
    assert others == [theirs.pk]


def test_an_experiment_made_through_the_api_belongs_to_its_caller(other_client, other_user):
    response = post_json(other_client, "/api/experiments/create", DEMO_BODY)

    assert Experiment.objects.get(pk=response.json()["id"]).owner == other_user


# -- no credentials, tokens ----------------------------------------------------------------


@pytest.mark.parametrize("method, url", [("get", "/api/experiments"), ("post", "/api/experiments/create"),
                                         *ENDPOINTS])
def test_anonymous_gets_401_json_on_every_endpoint(anonymous, finished_experiment, method, url):
    response = getattr(anonymous, method)(url.format(id=finished_experiment.pk))

    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["error"]
    assert response["WWW-Authenticate"] == "Bearer"
    assert Experiment.objects.count() == 1


def test_a_token_lets_a_script_list_create_and_start(anonymous, auth_headers, owner, pretrained_model):
    created = post_json(anonymous, "/api/experiments/create", {**DEMO_BODY, "pretrained_model": "digits_cnn"},
                        headers=auth_headers)
    experiment_id = created.json()["id"]
    listed = anonymous.get("/api/experiments", headers=auth_headers).json()["experiments"]
    started = anonymous.post(f"/api/experiments/{experiment_id}/start", headers=auth_headers)

    assert created.status_code == 201
    assert Experiment.objects.get(pk=experiment_id).owner == owner
    assert [e["id"] for e in listed] == [experiment_id]
    assert started.status_code == 202


def test_a_token_does_not_reach_another_users_experiment(anonymous, auth_headers, new_experiment, other_user):
    theirs = new_experiment(owned_by=other_user)

    assert anonymous.get(f"/api/experiments/{theirs.pk}", headers=auth_headers).status_code == 404


def test_a_revoked_token_is_401(anonymous, owner):
    row, token = ApiToken.issue(owner, "laptop")
    headers = {"Authorization": f"Bearer {token}"}
    assert anonymous.get("/api/experiments", headers=headers).status_code == 200

    row.delete()
    response = anonymous.get("/api/experiments", headers=headers)

    assert response.status_code == 401
    assert "revoked" in response.json()["error"]


@pytest.mark.parametrize("authorization", ["Bearer eo_not-a-token", "Bearer ", "Basic b3duZXI6cHc=", "eo_abc"])
def test_a_wrong_or_malformed_authorization_header_is_401_even_with_a_session(client, authorization):
    response = client.get("/api/experiments", headers={"Authorization": authorization})

    assert response.status_code == 401


def test_a_token_of_a_deactivated_user_is_401(anonymous, owner, auth_headers):
    owner.is_active = False
    owner.save()

    assert anonymous.get("/api/experiments", headers=auth_headers).status_code == 401


def test_only_the_hash_of_a_token_is_stored(owner):
    row, token = ApiToken.issue(owner, "ci")

    stored = json.dumps(list(ApiToken.objects.values()), default=str)
    assert token not in stored
    assert row.token_hash == ApiToken.hash(token) and len(row.token_hash) == 64
    assert token.startswith("eo_") and len(token) >= 40


# -- CSRF ----------------------------------------------------------------------------------


@pytest.fixture
def browser(owner):
    """A logged-in browser whose requests Django's CSRF check sees as they are (the test
    client skips the check unless asked), holding the CSRF cookie a page of ours gave it."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    browser.get("/")
    return browser


def test_a_cross_origin_text_plain_post_with_a_session_cookie_is_403_and_creates_nothing(browser):
    """What a hostile page can make a browser send: the cookies go along, the headers it
    cannot set do not."""
    response = browser.post("/api/experiments/create", data=json.dumps(DEMO_BODY), content_type="text/plain",
                            headers={"Origin": "https://evil.example"})

    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]
    assert not Experiment.objects.exists()


def test_a_session_json_post_without_the_csrf_token_is_403(browser):
    response = post_json(browser, "/api/experiments/create", DEMO_BODY)

    assert response.status_code == 403
    assert not Experiment.objects.exists()


def test_a_session_delete_without_the_csrf_token_is_403_and_keeps_the_experiment(browser, finished_experiment):
    response = browser.delete(f"/api/experiments/{finished_experiment.pk}")

    assert response.status_code == 403
    assert Experiment.objects.filter(pk=finished_experiment.pk).exists()


def test_a_session_post_with_the_csrf_token_as_htmx_sends_it_is_accepted(browser):
    token = browser.cookies["csrftoken"].value

    response = post_json(browser, "/api/experiments/create", DEMO_BODY, headers={"X-CSRFToken": token})

    assert response.status_code == 201


def test_a_session_get_needs_no_csrf_token(browser, finished_experiment):
    assert browser.get(f"/api/experiments/{finished_experiment.pk}").status_code == 200


def test_a_token_request_needs_no_csrf_token(owner, auth_headers):
    script = Client(enforce_csrf_checks=True)

    response = post_json(script, "/api/experiments/create", DEMO_BODY, headers=auth_headers)

    assert response.status_code == 201


def test_a_non_json_body_is_still_415_for_a_token_request(anonymous, auth_headers):
    response = anonymous.post("/api/experiments/create", data="name=x", content_type="text/plain",
                              headers=auth_headers)

    assert response.status_code == 415


# -- quotas --------------------------------------------------------------------------------


def test_starting_more_than_the_active_quota_is_429_with_a_message(
        client, other_client, new_experiment, other_user, pretrained_model, settings):
    settings.EDGEOPT_MAX_ACTIVE_PER_USER = 1
    first, second = (new_experiment(pretrained_model="digits_cnn") for _ in range(2))
    theirs = new_experiment(owned_by=other_user, pretrained_model="digits_cnn")

    assert client.post(f"/api/experiments/{first.pk}/start").status_code == 202
    refused = client.post(f"/api/experiments/{second.pk}/start")

    assert refused.status_code == 429
    assert "1 experiment(s) queued or running" in refused.json()["error"]
    assert "stop one" in refused.json()["error"]
    assert Experiment.objects.get(pk=second.pk).status == "ready"
    # The quota is per user: another user may still start theirs.
    assert other_client.post(f"/api/experiments/{theirs.pk}/start").status_code == 202


def test_restarting_the_one_running_experiment_is_not_counted_against_itself(
        client, new_experiment, pretrained_model, settings):
    settings.EDGEOPT_MAX_ACTIVE_PER_USER = 1
    experiment = new_experiment(pretrained_model="digits_cnn")
    client.post(f"/api/experiments/{experiment.pk}/start")

    again = client.post(f"/api/experiments/{experiment.pk}/start")

    assert again.status_code == 409  # already queued: the state answer, not the quota's


def test_an_upload_over_the_storage_quota_is_413_and_keeps_nothing(
        client, new_experiment, finished_experiment, settings, storage_root):
    settings.EDGEOPT_MAX_STORAGE_MB_PER_USER = 1
    # The owner's results already take almost all of it.
    ModelFile.objects.filter(experiment=finished_experiment, technique="ptq_int8", kind="deploy").update(
        size_bytes=2**20 - 1000)
    experiment = new_experiment()
    before = sorted(p.relative_to(storage_root) for p in storage_root.rglob("*") if p.is_file())

    response = client.post(f"/api/experiments/{experiment.pk}/upload",
                           {"file": _named(npz_bytes(), "data.npz"), "kind": "dataset"})

    assert response.status_code == 413
    assert "1 MB" in response.json()["error"] and "delete experiments" in response.json()["error"]
    assert experiment.dataset_file() is None
    assert sorted(p.relative_to(storage_root) for p in storage_root.rglob("*") if p.is_file()) == before


def test_the_storage_quota_counts_only_the_users_own_files(
        other_client, new_experiment, finished_experiment, other_user, settings):
    settings.EDGEOPT_MAX_STORAGE_MB_PER_USER = 1
    ModelFile.objects.filter(experiment=finished_experiment).update(size_bytes=2**20)  # the owner's, full
    theirs = new_experiment(owned_by=other_user)

    response = other_client.post(f"/api/experiments/{theirs.pk}/upload",
                                 {"file": _named(npz_bytes(), "data.npz"), "kind": "dataset"})

    assert response.status_code == 200


def test_replacing_a_dataset_frees_the_old_ones_bytes_for_the_quota(client, new_experiment, settings):
    experiment = new_experiment()
    data = npz_bytes()
    settings.EDGEOPT_MAX_STORAGE_MB_PER_USER = 1
    assert client.post(f"/api/experiments/{experiment.pk}/upload",
                       {"file": _named(data, "data.npz"), "kind": "dataset"}).status_code == 200
    ModelFile.objects.filter(experiment=experiment).update(size_bytes=2**20 - len(data) // 2)

    replaced = client.post(f"/api/experiments/{experiment.pk}/upload",
                           {"file": _named(data, "data.npz"), "kind": "dataset"})

    assert replaced.status_code == 200


def _named(content: bytes, name: str):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content)
