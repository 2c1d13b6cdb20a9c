"""GET /api/catalog, and the API and the setup form checking what they take against it."""
from __future__ import annotations

import json

import pytest

from experiments.forms import SetupForm
from experiments.models import Experiment
from optimization import catalog
from tests.conftest import DEMO_BODY

pytestmark = pytest.mark.django_db


def post_json(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def create(client, **changes):
    return post_json(client, "/api/experiments/create", {**DEMO_BODY, **changes})


def test_catalog_lists_everything_the_setup_form_shows(client):
    body = client.get("/api/catalog").json()
    form = SetupForm()

    def names(items):
        return {item["name"] for item in items}

    assert {value for value, _ in form.fields["framework"].choices} == names(body["frameworks"])
    assert {value for value, _ in form.fields["target_device"].choices} == names(body["devices"])
    assert {value for value, _ in form.fields["goal"].choices} == names(body["goals"])
    assert {value for value, _ in form.fields["techniques"].choices} == names(body["techniques"])
    assert {value for value, _ in form.fields["plan"].choices} == names(body["plans"])
    assert {name for name in form.fields if name.startswith("max_")} == names(body["constraints"])
    assert form.fields["epochs"].max_value == body["limits"]["max_epochs"]
    assert body["default_plan"] == {"api": "all", "page": "budget"}
    assert form.fields["plan"].initial == "budget"


def test_catalog_for_one_framework_flattens_the_options(client):
    body = client.get("/api/catalog?framework=tensorflow").json()
    int4 = next(t for t in body["techniques"] if t["name"] == "ptq_int4")
    scheme = next(o for o in int4["options"] if o["name"] == "scheme")
    assert scheme["default"] == "w4a8" and scheme["choices"] == ["w4a8", "fc4_conv8", "all4"]
    assert client.get("/api/catalog?framework=caffe").status_code == 400


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
def test_create_takes_options_by_their_catalog_names_in_both_frameworks(client, framework):
    response = create(client, framework=framework,
                      options={"prune_structured": {"pruning_ratio": 0.3}, "qat": {"epochs": 1}})

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["options"] == {"prune_structured": {"pruning_ratio": 0.3}, "qat": {"epochs": 1}}
    stored = Experiment.objects.get(pk=body["id"]).config["techniques"]
    assert stored["prune_structured"] == {"pruning_ratio": 0.3}


@pytest.mark.parametrize("options, words", [
    ({"prune_structured": {"keep_fraction": 0.5}}, "its options are pruning_ratio"),
    ({"prune_structured": {"pruning_ratio": 2}}, "pruning_ratio must be from 0.05 to 0.95"),
    ({"magic": {"epochs": 1}}, "unknown technique 'magic'; the techniques are ptq_int8"),
    ({"prune_structured": {"distill": False}}, "no option distill for pytorch"),
    ({"qat": 3}, "options.qat must be an object"),
    ([1, 2], "options must map a technique"),
])
def test_create_with_a_bad_option_returns_400_naming_what_is_allowed(client, options, words):
    response = create(client, options=options)

    assert response.status_code == 400
    assert words in response.json()["error"]
    assert not Experiment.objects.exists()


def test_unknown_constraint_returns_400_naming_the_known_ones(client):
    response = create(client, constraints={"max_power_w": 3})

    assert response.status_code == 400
    assert all(name in response.json()["error"] for name in catalog.CONSTRAINT_NAMES)


def test_energy_goal_and_constraint_are_taken(client):
    response = create(client, goal="min_energy", constraints={"max_energy_mj": 5.0})

    assert response.status_code == 201
    assert response.json()["constraints"] == {"max_energy_mj": 5.0}


def test_plan_and_time_budget_are_stored_and_shown(client):
    body = create(client, plan="budget", time_budget_s=1800).json()
    assert (body["plan"], body["time_budget_s"]) == ("budget", 1800)
    assert create(client).json()["plan"] == "all"  # the API's default, as API.md has it


@pytest.mark.parametrize("changes, words", [
    ({"plan": "cheapest"}, "plan"),
    ({"time_budget_s": "1h"}, "time_budget_s must be a number"),
    ({"time_budget_s": 0}, "time_budget_s"),
])
def test_a_bad_plan_or_budget_returns_400(client, changes, words):
    response = create(client, **changes)
    assert response.status_code == 400
    assert words in response.json()["error"]


def test_the_setup_page_defaults_to_the_budget_plan(client):
    form = SetupForm(data={"name": "x", "framework": "pytorch", "target_device": "rpi4", "dataset": "custom",
                           "goal": "min_size"})
    form.is_valid()
    assert form.cleaned_data["plan"] == "budget"
