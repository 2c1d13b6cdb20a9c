"""Accounts: the pages need a login and show only the user's own experiments; sign-up (and
switching it off), log in with a lock-out after repeated failures, log out, password change,
the API tokens page, `create_api_token`, and the `demo` user `seed_demo` makes."""
from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from experiments.models import ApiToken, Experiment

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-test-passphrase-41"


@pytest.fixture
def fast_passwords(settings):
    """Password hashing as fast as it can be: these tests log in with real passwords."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def member(django_user_model, fast_passwords):
    return django_user_model.objects.create_user(username="member", password=PASSWORD)


def log_in(client, username, password):
    return client.post("/accounts/login/", {"username": username, "password": password})


# -- pages need a login, and show only one's own --------------------------------------------


@pytest.mark.parametrize("url", ["/", "/experiments/{id}/", "/experiments/{id}/results/", "/accounts/tokens/",
                                 "/accounts/password/"])
def test_pages_send_a_visitor_to_the_login_page(anonymous, finished_experiment, url):
    url = url.format(id=finished_experiment.pk)

    response = anonymous.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={url}"


@pytest.mark.parametrize("method, url", [("get", "/experiments/{id}/"), ("get", "/experiments/{id}/results/"),
                                         ("post", "/experiments/{id}/stop")])
def test_another_users_experiment_pages_are_404(other_client, ready_experiment, method, url):
    ready_experiment.enqueue()
    ready_experiment.mark_running()

    response = getattr(other_client, method)(url.format(id=ready_experiment.pk))

    assert response.status_code == 404
    assert not Experiment.objects.get(pk=ready_experiment.pk).stop_requested


def test_the_experiments_page_lists_only_the_users_own_experiments(client, other_client, new_experiment, other_user):
    new_experiment(name="mine-alone")
    new_experiment(owned_by=other_user, name="theirs-alone")

    mine, theirs = client.get("/experiments/").content.decode(), other_client.get("/experiments/").content.decode()

    assert "mine-alone" in mine and "theirs-alone" not in mine
    assert "theirs-alone" in theirs and "mine-alone" not in theirs


def test_an_experiment_made_on_the_setup_page_belongs_to_the_user(other_client, other_user, pretrained_model):
    other_client.post("/", {"name": "from the page", "framework": "pytorch", "target_device": "rpi4",
                            "dataset": "digits", "goal": "balanced", "techniques": ["ptq_int8"],
                            "pretrained_model": "digits_cnn"})

    assert Experiment.objects.get(name="from the page").owner == other_user


def test_the_setup_page_says_when_the_active_quota_is_reached(client, new_experiment, pretrained_model, settings):
    settings.EDGEOPT_MAX_ACTIVE_PER_USER = 1
    new_experiment(pretrained_model="digits_cnn").enqueue()

    response = client.post("/", {"name": "one too many", "framework": "pytorch", "target_device": "rpi4",
                                 "dataset": "digits", "goal": "balanced", "techniques": ["ptq_int8"],
                                 "pretrained_model": "digits_cnn"})

    assert response.status_code == 400
    assert "queued or running" in response.content.decode()
    assert not Experiment.objects.filter(name="one too many").exists()


# -- log in, lock-out, log out, password ---------------------------------------------------


def test_logging_in_opens_the_page_asked_for(anonymous, member):
    response = anonymous.post("/accounts/login/?next=/accounts/tokens/",
                              {"username": "member", "password": PASSWORD, "next": "/accounts/tokens/"})

    assert response.status_code == 302 and response["Location"] == "/accounts/tokens/"
    assert anonymous.get("/").status_code == 200


def test_a_wrong_password_shows_the_form_again_with_an_error(anonymous, member):
    response = log_in(anonymous, "member", "wrong")

    assert response.status_code == 200
    assert "enter a correct username and password" in response.content.decode()


def test_repeated_failed_logins_lock_the_username_out_even_with_the_right_password(anonymous, member, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        log_in(anonymous, "member", "wrong")

    response = log_in(anonymous, "member", PASSWORD)

    assert response.status_code == 429
    assert "Too many failed logins" in response.content.decode()
    assert anonymous.get("/").status_code == 302  # still not logged in


def test_the_lock_out_is_per_username(anonymous, member, django_user_model, settings):
    django_user_model.objects.create_user(username="colleague", password=PASSWORD)
    for _ in range(settings.AXES_FAILURE_LIMIT):
        log_in(anonymous, "member", "wrong")

    assert log_in(anonymous, "colleague", PASSWORD).status_code == 302


def test_logging_out_ends_the_session(client):
    response = client.post("/accounts/logout/")

    assert response.status_code == 302
    assert client.get("/").status_code == 302


def test_password_change_takes_the_new_password(member, fast_passwords):
    browser = Client()
    browser.force_login(member)

    response = browser.post("/accounts/password/", {"old_password": PASSWORD, "new_password1": "another-passphrase-77",
                                                    "new_password2": "another-passphrase-77"})

    assert response.status_code == 302 and response["Location"] == "/accounts/password/done/"
    member.refresh_from_db()
    assert member.check_password("another-passphrase-77")


# -- sign-up -------------------------------------------------------------------------------


def test_sign_up_makes_an_account_and_logs_it_in(anonymous, django_user_model, fast_passwords):
    response = anonymous.post("/accounts/signup/", {"username": "newcomer", "password1": "a-fine-passphrase-12",
                                                    "password2": "a-fine-passphrase-12"})

    assert response.status_code == 302
    assert django_user_model.objects.filter(username="newcomer").exists()
    assert anonymous.get("/").status_code == 200


def test_sign_up_refuses_a_weak_password_with_a_message(anonymous, django_user_model):
    response = anonymous.post("/accounts/signup/", {"username": "newcomer", "password1": "123", "password2": "123"})

    assert response.status_code == 400
    assert "too short" in response.content.decode()
    assert not django_user_model.objects.filter(username="newcomer").exists()


def test_with_sign_up_switched_off_there_is_no_sign_up(anonymous, django_user_model, settings):
    settings.EDGEOPT_ALLOW_SIGNUP = False

    page = anonymous.get("/accounts/signup/")
    post = anonymous.post("/accounts/signup/", {"username": "newcomer", "password1": "a-fine-passphrase-12",
                                                "password2": "a-fine-passphrase-12"})
    login_page = anonymous.get("/accounts/login/").content.decode()

    assert page.status_code == 404 and post.status_code == 404
    assert not django_user_model.objects.filter(username="newcomer").exists()
    assert "/accounts/signup/" not in login_page


def test_the_login_page_offers_sign_up_when_it_is_on(anonymous):
    assert "/accounts/signup/" in anonymous.get("/accounts/login/").content.decode()


@pytest.mark.parametrize("name", ["EDGEOPT_ALLOW_SIGNUP", "EDGEOPT_MAX_ACTIVE_PER_USER",
                                  "EDGEOPT_MAX_STORAGE_MB_PER_USER", "EDGEOPT_LOGIN_FAILURE_LIMIT"])
def test_a_bad_account_setting_stops_start_up(name):
    from tests.test_settings import import_settings

    result = import_settings(**{name: "nope"})

    assert result.returncode != 0
    assert f"ImproperlyConfigured: {name} must be" in result.stderr


# -- the API tokens page -------------------------------------------------------------------


def test_a_token_made_on_the_page_is_shown_once_and_works(client, anonymous, owner):
    made = client.post("/accounts/tokens/", {"name": "laptop"})
    token = made.context["new_token"]
    again = client.get("/accounts/tokens/").content.decode()

    assert made.status_code == 201 and token in made.content.decode()
    assert token not in again and "laptop" in again and token[:8] in again
    assert anonymous.get("/api/experiments", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_htmx_gets_only_the_token_panel(client):
    response = client.post("/accounts/tokens/", {"name": "ci"}, headers={"HX-Request": "true"})

    html = response.content.decode()
    assert html.lstrip().startswith('<section id="token-panel">')
    assert "<header>" not in html


def test_a_token_needs_a_name(client, owner):
    response = client.post("/accounts/tokens/", {"name": ""})

    assert response.status_code == 400
    assert not ApiToken.objects.exists()


def test_revoking_a_token_on_the_page_stops_it_at_once(client, anonymous, owner):
    row, token = ApiToken.issue(owner, "old script")

    response = client.post(f"/accounts/tokens/{row.pk}/revoke")

    assert response.status_code == 302
    assert anonymous.get("/api/experiments", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_nobody_can_revoke_or_see_another_users_token(other_client, owner):
    row, _ = ApiToken.issue(owner, "owner-laptop")

    assert other_client.post(f"/accounts/tokens/{row.pk}/revoke").status_code == 404
    assert "owner-laptop" not in other_client.get("/accounts/tokens/").content.decode()
    assert ApiToken.objects.filter(pk=row.pk).exists()


# -- create_api_token ----------------------------------------------------------------------


def test_create_api_token_prints_the_token_alone(capsys, owner, anonymous):
    call_command("create_api_token", "owner", "--name", "nightly")

    out = capsys.readouterr().out
    token = out.strip()
    assert out == token + "\n" and " " not in token
    assert ApiToken.objects.get(user=owner).name == "nightly"
    assert anonymous.get("/api/experiments", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_create_api_token_for_a_missing_user_says_to_pass_create_user(db):
    with pytest.raises(CommandError, match="--create-user"):
        call_command("create_api_token", "nobody")


def test_create_api_token_can_make_the_user(capsys, django_user_model):
    call_command("create_api_token", "robot", "--create-user")

    robot = django_user_model.objects.get(username="robot")
    assert not robot.has_usable_password()
    assert ApiToken.objects.get(user=robot).token_hash == ApiToken.hash(capsys.readouterr().out.strip())


# -- the demo user -------------------------------------------------------------------------


@pytest.fixture
def seed_without_training(monkeypatch, storage_root):
    monkeypatch.setattr("optimization.demo.seed_demo", lambda root, frameworks, log: [])


def test_seed_demo_makes_a_demo_user_and_prints_its_password(capsys, seed_without_training, fast_passwords,
                                                             django_user_model, monkeypatch):
    monkeypatch.delenv("EDGEOPT_DEMO_PASSWORD", raising=False)

    call_command("seed_demo", "--framework", "pytorch")

    line = next(line for line in capsys.readouterr().out.splitlines() if "log in as demo" in line)
    password = line.rsplit(" ", 1)[-1]
    assert django_user_model.objects.get(username="demo").check_password(password)
    assert log_in(Client(), "demo", password).status_code == 302


def test_seed_demo_keeps_the_demo_password_on_a_second_run(capsys, seed_without_training, fast_passwords,
                                                           django_user_model, monkeypatch):
    monkeypatch.delenv("EDGEOPT_DEMO_PASSWORD", raising=False)
    call_command("seed_demo", "--framework", "pytorch")
    first = django_user_model.objects.get(username="demo").password

    call_command("seed_demo", "--framework", "pytorch")

    assert django_user_model.objects.get(username="demo").password == first
    assert "changepassword demo" in capsys.readouterr().out


def test_seed_demo_takes_the_password_from_the_environment(seed_without_training, fast_passwords,
                                                           django_user_model, monkeypatch):
    monkeypatch.setenv("EDGEOPT_DEMO_PASSWORD", "demo-pass-from-env-9")

    call_command("seed_demo", "--framework", "pytorch")

    assert django_user_model.objects.get(username="demo").check_password("demo-pass-from-env-9")


# -- experiments made before accounts ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_accounts_migration_gives_older_experiments_to_a_demo_user_without_a_password():
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before = [("experiments", "0002_measurement_spread")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    OldExperiment = executor.loader.project_state(before).apps.get_model("experiments", "Experiment")
    old = OldExperiment.objects.create(name="from before", framework="pytorch", target_device="rpi4",
                                       dataset="digits")

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    experiment = Experiment.objects.get(pk=old.pk)
    assert experiment.owner.username == "demo"
    assert not experiment.owner.has_usable_password()  # seed_demo sets one and prints it
