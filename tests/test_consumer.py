"""WS /ws/experiments/{id} through the real ASGI application: state at once on connect,
every change of the progress row pushed, a final status message."""
from __future__ import annotations

import functools
import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from edgeopt_site.asgi import application
from experiments.models import Experiment, ExperimentProgress

pytestmark = pytest.mark.django_db(transaction=True)
ORIGIN = (b"origin", b"http://testserver")
TIMEOUT = 5


def run_async(scenario):
    """Run an async test body on an event loop (no pytest async plugin is installed)."""

    @functools.wraps(scenario)
    def test(*args, **kwargs):
        return async_to_sync(scenario)(*args, **kwargs)

    return test


@pytest.fixture
def session_cookie(client):
    """The owner's browser: the session cookie the logged-in `client` holds."""
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


@pytest.fixture
def communicator(session_cookie):
    """A browser page of this site, logged in as the owner."""

    def connect_to(experiment_id, query=""):
        return WebsocketCommunicator(application, f"/ws/experiments/{experiment_id}{query}",
                                     headers=[ORIGIN, session_cookie])

    return connect_to


@pytest.fixture
def running_experiment(ready_experiment):
    ready_experiment.enqueue()
    ready_experiment.mark_running()
    return ready_experiment


@run_async
async def test_unknown_experiment_is_closed_with_4404(communicator):
    socket = communicator(424242)

    connected, _ = await socket.connect(timeout=TIMEOUT)
    closed = await socket.receive_output(timeout=TIMEOUT)

    assert connected
    assert closed == {"type": "websocket.close", "code": 4404}


@run_async
async def test_a_foreign_origin_is_refused(running_experiment, session_cookie):
    socket = WebsocketCommunicator(application, f"/ws/experiments/{running_experiment.pk}",
                                   headers=[(b"origin", b"http://evil.example"), session_cookie])

    connected, _ = await socket.connect(timeout=TIMEOUT)

    assert not connected


@run_async
async def test_connect_sends_the_current_state_at_once(running_experiment, communicator):
    await sync_to_async(ExperimentProgress.publish)(
        running_experiment, technique="qat", technique_index=6, technique_progress=0.42,
        overall_progress=0.81, eta_seconds=37.0, message="fine-tuning epoch 2/3", metrics={"loss": 0.21})
    socket = communicator(running_experiment.pk)

    connected, _ = await socket.connect(timeout=TIMEOUT)
    message = await socket.receive_json_from(timeout=TIMEOUT)

    assert connected
    assert message["type"] == "progress"
    assert message["status"] == "running"
    assert message["technique"] == "qat"
    assert message["technique_progress"] == 0.42
    assert message["metrics"] == {"loss": 0.21}
    await socket.disconnect()


@run_async
async def test_a_progress_row_change_is_pushed(running_experiment, communicator):
    socket = communicator(running_experiment.pk)
    await socket.connect(timeout=TIMEOUT)
    first = await socket.receive_json_from(timeout=TIMEOUT)

    await sync_to_async(ExperimentProgress.publish)(running_experiment, technique="ptq_int8",
                                                     technique_progress=0.5, message="calibrating")
    pushed = await socket.receive_json_from(timeout=TIMEOUT)

    assert pushed["seq"] > first["seq"]
    assert pushed["technique"] == "ptq_int8"
    assert pushed["message"] == "calibrating"
    await socket.disconnect()


@run_async
async def test_the_terminal_state_sends_a_status_message_and_polling_stops(running_experiment, communicator):
    socket = communicator(running_experiment.pk)
    await socket.connect(timeout=TIMEOUT)
    await socket.receive_json_from(timeout=TIMEOUT)

    await sync_to_async(running_experiment.finish)(Experiment.Status.COMPLETED)
    final = await socket.receive_json_from(timeout=TIMEOUT)
    await sync_to_async(ExperimentProgress.publish)(running_experiment, message="after the end")

    assert final["type"] == "status"
    assert final["status"] == "completed"
    assert final["overall_progress"] == 1.0
    assert await socket.receive_nothing(timeout=1.0)
    await socket.disconnect()


@run_async
async def test_a_finished_experiment_sends_its_status_on_connect(finished_experiment, communicator):
    socket = communicator(finished_experiment.pk)
    await socket.connect(timeout=TIMEOUT)

    message = await socket.receive_json_from(timeout=TIMEOUT)

    assert message["type"] == "status"
    assert message["status"] == "completed"
    await socket.disconnect()


@run_async
async def test_html_format_sends_the_partial_with_a_stable_id_to_swap(running_experiment, communicator):
    await sync_to_async(ExperimentProgress.publish)(running_experiment, technique="qat", message="epoch 1/2")
    socket = communicator(running_experiment.pk, "?format=html")
    await socket.connect(timeout=TIMEOUT)

    html = await socket.receive_from(timeout=TIMEOUT)

    assert 'id="progress-panel"' in html
    assert 'hx-swap-oob="true"' in html
    assert "epoch 1/2" in html
    with pytest.raises(json.JSONDecodeError):
        json.loads(html)
    await socket.disconnect()
