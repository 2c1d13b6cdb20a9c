"""Settings come from the environment and refuse bad values at start-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from edgeopt_site.settings import database_config, envbool, envint
from tests.conftest import ROOT


def import_settings(**env) -> subprocess.CompletedProcess:
    """Import the settings module in a fresh interpreter with these environment variables."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DEBUG", "DATABASE_URL", "SECRET_KEY", "SECRET_KEY_FILE", "EDGEOPT_MAX_UPLOAD_MB")}
    return subprocess.run([sys.executable, "-c", "import edgeopt_site.settings"], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_debug_maybe_stops_start_up():
    result = import_settings(DEBUG="maybe")

    assert result.returncode != 0
    assert "ImproperlyConfigured: DEBUG must be one of" in result.stderr


def test_unsupported_database_url_stops_start_up():
    result = import_settings(DATABASE_URL="mysql://user@localhost/edgeopt")

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr


def test_production_without_secret_key_stops_start_up():
    result = import_settings(DEBUG="false")

    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_production_with_a_secret_key_file_starts(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("a-real-secret\n")

    assert import_settings(DEBUG="false", SECRET_KEY_FILE=str(key_file)).returncode == 0


@pytest.mark.parametrize("url", ["nonsense://x", "mysql://u@h/db", "sqlite://:memory:"])
def test_database_config_refuses_unsupported_urls(url, tmp_path):
    with pytest.raises(ImproperlyConfigured):
        database_config(url, tmp_path)


def test_sqlite_is_set_up_for_a_web_and_a_worker_process(tmp_path):
    config = database_config(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path)

    assert config["TEST"]["NAME"] == str(tmp_path / f"test_db_{os.getpid()}.sqlite3")
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in config["OPTIONS"]["init_command"]


def test_postgres_url_uses_the_postgresql_backend(tmp_path):
    config = database_config("postgres://edge:pw@db:5432/edgeopt", tmp_path)

    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["NAME"], config["HOST"], config["PORT"]) == ("edgeopt", "db", 5432)


@pytest.mark.parametrize("helper, value", [(envbool, "maybe"), (envint, "ten"), (envint, "-1")])
def test_env_helpers_refuse_bad_values(monkeypatch, helper, value):
    monkeypatch.setenv("EDGEOPT_SOMETHING", value)

    with pytest.raises(ImproperlyConfigured):
        helper("EDGEOPT_SOMETHING", "1")


def test_the_task_retry_outlasts_its_timeout():
    assert settings.Q_CLUSTER["retry"] > settings.Q_CLUSTER["timeout"]
    assert settings.Q_CLUSTER["orm"] == "default"


def test_check_deploy_with_the_production_settings_set_prints_no_warning():
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY", "SECRET_KEY_FILE")}
    env.update(DEBUG="false", SECRET_KEY="x" * 20 + "-a-long-random-production-key-0123456789-abcdef",
               ALLOWED_HOSTS="edgeopt.example", SECURE_SSL_REDIRECT="true", SECURE_HSTS_SECONDS="31536000",
               SECURE_HSTS_INCLUDE_SUBDOMAINS="true", SECURE_HSTS_PRELOAD="true", SESSION_COOKIE_SECURE="true",
               CSRF_COOKIE_SECURE="true", BEHIND_TLS_PROXY="true")

    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db
def test_every_static_file_the_page_links_is_served_with_debug_off(settings, tmp_path):
    import re

    from django.core.management import call_command
    from django.test import Client

    settings.STATIC_ROOT = tmp_path / "staticfiles"
    call_command("collectstatic", "--noinput", verbosity=0)
    settings.DEBUG = False
    client = Client()  # a new handler: WhiteNoise lists STATIC_ROOT when it starts

    page = client.get("/accounts/login/").content.decode()  # the page everyone reaches first
    linked = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page))

    assert any(url.endswith(".css") for url in linked) and any(url.endswith(".js") for url in linked)
    for url in linked:
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize(("name", "value"), [("EDGEOPT_BROKER", "rabbitmq"), ("CHANNEL_LAYER", "postgres"),
                                             ("REDIS_URL", "localhost:6379"), ("EDGEOPT_WORKERS", "0")])
def test_bad_scale_out_settings_stop_start_up(name, value):
    result = import_settings(**{name: value})

    assert result.returncode != 0
    assert f"ImproperlyConfigured: {name} must" in result.stderr


def test_redis_broker_and_channel_layer_come_from_the_environment():
    shown = "import json, edgeopt_site.settings as s; print(json.dumps([s.Q_CLUSTER, s.CHANNEL_LAYERS, s.EDGEOPT_PROGRESS_POLL_MS]))"
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEOPT_BROKER", "CHANNEL_LAYER", "EDGEOPT_WORKERS")}
    default = subprocess.run([sys.executable, "-c", shown], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60)
    scaled = subprocess.run([sys.executable, "-c", shown], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**env, "EDGEOPT_BROKER": "redis", "CHANNEL_LAYER": "redis", "EDGEOPT_WORKERS": "3",
                                 "REDIS_URL": "redis://cache:6379/2"})

    (q_default, layers_default, poll_default), (q_scaled, layers_scaled, poll_scaled) = (
        json.loads(default.stdout), json.loads(scaled.stdout))
    assert q_default["orm"] == "default" and "redis" not in q_default and q_default["workers"] == 1
    assert layers_default["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer" and poll_default == 250
    assert q_scaled["redis"] == "redis://cache:6379/2" and "orm" not in q_scaled and q_scaled["workers"] == 3
    assert layers_scaled["default"]["CONFIG"]["hosts"] == ["redis://cache:6379/2"] and poll_scaled == 5000
