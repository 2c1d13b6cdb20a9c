"""A real stack for end-to-end tests: Daphne and a django-q2 worker as subprocesses, on the
test database pytest-django made, with storage in a temporary folder."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def test_database_url() -> str:
    """The URL of the database pytest-django created, for the subprocesses to share."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        name = str(db["NAME"])
        if name == ":memory:" or "mode=memory" in name:
            raise RuntimeError("an in-memory SQLite test database cannot be shared with subprocesses")
        return f"sqlite:///{name}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listened on port {port} within {timeout}s")


class Stack:
    """The running servers, and a script client of them: every request (HTTP and WebSocket)
    carries `auth_headers`, the API token of a user made in the test database."""

    def __init__(self, port: int, log_dir: Path, auth_headers: dict):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_dir = log_dir
        self.auth_headers = auth_headers

    def request(self, method: str, path: str, body: dict | None = None, files: dict | None = None):
        """(status, parsed JSON or raw bytes, headers)"""
        data, headers = None, dict(self.auth_headers)
        if body is not None:
            data, headers = json.dumps(body).encode(), {**headers, "Content-Type": "application/json"}
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, _decode(resp), resp.headers
        except urllib.error.HTTPError as err:
            return err.code, _decode(err), err.headers

    def upload(self, experiment_id: int, filename: str, content: bytes, **fields: str):
        """POST a multipart upload, as `curl -F file=@... -F kind=...` would."""
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        req = urllib.request.Request(f"{self.base}/api/experiments/{experiment_id}/upload", data=b"".join(parts),
                                     method="POST", headers={**self.auth_headers,
                                                             "Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, _decode(resp)
        except urllib.error.HTTPError as err:
            return err.code, _decode(err)

    def wait_until_finished(self, experiment_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, experiment, _ = self.request("GET", f"/api/experiments/{experiment_id}")
            if experiment["status"] in ("completed", "failed", "stopped"):
                return experiment
            time.sleep(1)
        raise AssertionError(f"experiment {experiment_id} not finished within {timeout}s:\n{self.logs()}")

    def ws_url(self, experiment_id: int) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/experiments/{experiment_id}"

    def websocket(self, experiment_id: int):
        """A script's WebSocket to the experiment: the token in the Authorization header, no Origin."""
        from websockets.sync.client import connect

        return connect(self.ws_url(experiment_id), additional_headers=self.auth_headers)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


def _decode(resp):
    raw = resp.read()
    if resp.headers.get("Content-Type", "").startswith("application/json"):
        return json.loads(raw)
    return raw


def stack_env(storage_root: Path, **overrides: str) -> dict[str, str]:
    """The environment of the stack's processes: the test database, storage, and overrides
    (EDGEOPT_STALE_AFTER_S, EDGEOPT_BROKER, ...)."""
    return {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "EDGEOPT_STORAGE_ROOT": str(storage_root),
        "DJANGO_SETTINGS_MODULE": "edgeopt_site.settings",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **overrides,
    }


class Processes:
    """Server processes, each leading its own process group (its children go down with it)."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.running: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "a")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.running[name] = process
        return process

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        return self.start(name, [sys.executable, "manage.py", "qcluster"])

    def start_web(self, port: int) -> subprocess.Popen:
        return self.start("web", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                  "edgeopt_site.asgi:application"])

    def kill(self, name: str) -> None:
        """kill -9 of the whole qcluster (or server): as when its machine goes down."""
        _signal_group(self.running[name], signal.SIGKILL)
        self.running[name].wait()

    def stop_all(self) -> None:
        """SIGTERM to each main process (a qcluster hands its run back and stops its children),
        then SIGKILL to whatever is left of each group."""
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            process.wait()


@contextmanager
def running_stack(storage_root: Path, log_dir: Path, auth_headers: dict, workers: int = 1, **env: str):
    """Daphne + `workers` qclusters (named worker, worker2, ...) on the test database; all
    stopped on exit. The Stack's `processes` starts, kills and restarts them. `auth_headers`
    (a token of a user in that database) go with every request the Stack makes."""
    port = free_port()
    processes = Processes(stack_env(storage_root, **env), log_dir)
    try:
        web = processes.start_web(port)
        for number in range(1, workers + 1):
            processes.start_worker("worker" if number == 1 else f"worker{number}")
        wait_for_port(port, web)
        stack = Stack(port, log_dir, auth_headers)
        stack.processes = processes
        yield stack
    finally:
        processes.stop_all()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
