"""Request bodies over the limit are refused before they are read, under a real Daphne, and
the web process's memory does not grow with what the client tries to send."""
from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from edgeopt_site.body_limits import BodyLimitMiddleware
from tests.live import ROOT, free_port, wait_for_port

UPLOAD_LIMIT_MB = 4
RSS_BOUND_MB = 300
TWO_GIB = 2 * 2**30


@pytest.fixture
def daphne(tmp_path):
    port = free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "edgeopt_site.settings", "PYTHONUNBUFFERED": "1",
           "EDGEOPT_STORAGE_ROOT": str(tmp_path), "EDGEOPT_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    log = open(tmp_path / "daphne.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                "edgeopt_site.asgi:application"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, process)
        yield port, process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        print((tmp_path / "daphne.log").read_text(errors="replace")[-4000:])


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send_until_answered(port: int, head: bytes, chunk: bytes, total: int, process) -> tuple[bytes, int, float]:
    """Send the head, then body chunks until the server answers (or `total` bytes went out).
    Returns (the answer, bytes of body sent, the server's highest RSS seen)."""
    peak = rss_mb(process.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
            peak = max(peak, rss_mb(process.pid))
        answer = b""
        deadline = time.monotonic() + 60
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            answer += data
    return answer, sent, max(peak, rss_mb(process.pid))


def hex_chunk(size: int) -> bytes:
    return f"{size:x}\r\n".encode() + b"x" * size + b"\r\n"


@pytest.mark.slow
def test_a_declared_two_gib_json_body_is_refused_before_any_of_it_is_read(daphne):
    port, process = daphne
    head = (f"POST /api/experiments/create HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {TWO_GIB}\r\n\r\n").encode()

    answer, sent, peak = send_until_answered(port, head, b" " * 2**20, TWO_GIB, process)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"Content-Type: application/json" in answer
    assert sent < 64 * 2**20  # refused on the headers, not after the body
    assert peak < RSS_BOUND_MB


@pytest.mark.slow
def test_a_streamed_two_gib_upload_is_refused_once_it_passes_the_limit(daphne):
    port, process = daphne
    head = (b"POST /api/experiments/1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n")

    answer, sent, peak = send_until_answered(port, head, hex_chunk(2**20), TWO_GIB, process)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < TWO_GIB // 4  # it stopped reading long before the end
    assert peak < RSS_BOUND_MB
    assert process.poll() is None  # the server is still up


@pytest.mark.slow
def test_a_body_within_the_limit_still_reaches_the_application(daphne):
    port, process = daphne
    body = b'{"name": "x"}'
    head = (f"POST /api/experiments/create HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    answer, _, _ = send_until_answered(port, head, b"", 0, process)

    # The application's own answer (no credentials: 401), not the guard's 413.
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def asgi_call(headers: list, chunks: list[bytes]):
    """Drive BodyLimitMiddleware around an app that reads the whole body and answers 200."""
    sent, app_calls = [], []

    async def app(scope, receive, send):
        app_calls.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/api/experiments/create", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app)(scope, receive, send))
    return sent[0]["status"], app_calls


def test_asgi_guard_refuses_a_declared_length_over_the_limit_without_calling_the_app(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    status, app_calls = asgi_call([(b"content-type", b"application/json"), (b"content-length", b"5000")], [b""])

    assert status == 413 and app_calls == []


def test_asgi_guard_refuses_a_streamed_body_once_it_passes_the_limit(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    status, _ = asgi_call([(b"content-type", b"application/json")], [b"x" * 600, b"x" * 600])

    assert status == 413


def test_asgi_guard_passes_a_body_within_the_limit(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    status, app_calls = asgi_call([(b"content-type", b"application/json")], [b"x" * 600])

    assert status == 200 and app_calls == ["/api/experiments/create"]
