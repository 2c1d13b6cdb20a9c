"""The web process never loads torch or tensorflow: a fresh interpreter imports the ASGI
application, resolves every URL, renders the pages, validates uploads, and then looks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

WEB_SESSION = r"""
import json, os, pickle, sys
from edgeopt_site.asgi import application  # noqa: F401  (sets Django up)
from django.core.management import call_command
from django.test import Client
from django.urls import resolve, reverse
from experiments.urls import urlpatterns
from django.core.files.uploadedfile import SimpleUploadedFile

call_command("migrate", verbosity=0)
for pattern in urlpatterns:
    sample = {"experiment_id": 1, "technique": "ptq_int8"}
    url = reverse(f"experiments:{pattern.name}", kwargs={k: sample[k] for k in pattern.pattern.converters})
    assert resolve(url).url_name == pattern.name
from django.contrib.auth.models import User
statuses = {"login": Client().get("/accounts/login/").status_code}
client = Client()
client.force_login(User.objects.create_user("web"))
created = client.post("/api/experiments/create", json.dumps({
    "name": "web", "framework": "pytorch", "target_device": "rpi4", "dataset": "digits"}),
    content_type="application/json").json()
pk = created["id"]
statuses["setup"] = client.get("/").status_code
statuses["monitor"] = client.get(f"/experiments/{pk}/").status_code
statuses["results"] = client.get(f"/experiments/{pk}/results/").status_code
statuses["admin"] = client.get("/admin/").status_code
statuses["garbage"] = client.post(f"/api/experiments/{pk}/upload",
    {"file": SimpleUploadedFile("m.pt", b"junk")}).status_code
statuses["pickle"] = client.post(f"/api/experiments/{pk}/upload",
    {"file": SimpleUploadedFile("m.pth", pickle.dumps({"w": [1.0]}, protocol=2) + pickle.dumps(os.system)),
     "architecture": "digits_cnn"}).status_code
statuses["keras"] = client.post(f"/api/experiments/{pk}/upload",
    {"file": SimpleUploadedFile("m.keras", b"PK\x03\x04junk")}).status_code
with open(os.environ["STATE_DICT"], "rb") as handle:  # keys and shapes read without torch
    weights = handle.read()
statuses["state_dict"] = client.post(f"/api/experiments/{pk}/upload",
    {"file": SimpleUploadedFile("w.pth", weights), "architecture": "digits_cnn"}).status_code
statuses["other_architecture"] = client.post(f"/api/experiments/{pk}/upload",
    {"file": SimpleUploadedFile("w.pth", weights), "architecture": "resnet_small"}).status_code
print(json.dumps({"statuses": statuses, "urls": len(urlpatterns),
                  "heavy": sorted(m for m in ("torch", "tensorflow", "keras", "tf_keras") if m in sys.modules)}))
"""


def test_the_web_process_serves_pages_and_checks_uploads_without_torch_or_tensorflow(tmp_path, model_files):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "edgeopt_site.settings", "STATE_DICT": str(model_files["state_dict"]),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'web.sqlite3'}", "EDGEOPT_STORAGE_ROOT": str(tmp_path)}

    result = subprocess.run([sys.executable, "-c", WEB_SESSION], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == {"login": 200, "setup": 200, "monitor": 200, "results": 200, "admin": 302,
                                  "garbage": 400, "pickle": 400, "keras": 400, "state_dict": 200,
                                  "other_architecture": 400}
    assert report["urls"] >= 12
    assert report["heavy"] == []
