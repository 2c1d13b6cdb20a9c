"""Who may open WS /ws/experiments/{id}: the owner's browser (session cookie, our Origin) and
the owner's scripts (a token, with or without Origin); a foreign page is refused at the
handshake, a client without credentials is closed with 4401, another user with 4404 and
without joining the experiment's group. Driven through the real ASGI application, and once
through a real Daphne."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from edgeopt_site.asgi import application
from experiments.sink import group_name
from tests.test_consumer import TIMEOUT, run_async

pytestmark = pytest.mark.django_db(transaction=True)
OUR_ORIGIN = (b"origin", b"http://testserver")


def socket(experiment_id, *headers, query=""):
    return WebsocketCommunicator(application, f"/ws/experiments/{experiment_id}{query}", headers=list(headers))


def cookie_of(client):
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def bearer(token):
    return (b"authorization", f"Bearer {token}".encode())


async def closed_with(communicator) -> int | None:
    """The close code after the connection was accepted (None when it sends data instead)."""
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    output = await communicator.receive_output(timeout=TIMEOUT)
    return output.get("code") if output["type"] == "websocket.close" else None


@run_async
async def test_a_script_with_a_token_and_no_origin_connects_and_gets_the_state(finished_experiment, api_token):
    communicator = socket(finished_experiment.pk, bearer(api_token))

    connected, _ = await communicator.connect(timeout=TIMEOUT)
    message = await communicator.receive_json_from(timeout=TIMEOUT)

    assert connected
    assert message["status"] == "completed"
    await communicator.disconnect()


@run_async
async def test_a_script_may_send_the_token_in_the_query_string(finished_experiment, api_token):
    communicator = socket(finished_experiment.pk, query=f"?token={api_token}")

    await communicator.connect(timeout=TIMEOUT)

    assert (await communicator.receive_json_from(timeout=TIMEOUT))["status"] == "completed"
    await communicator.disconnect()


@run_async
async def test_a_session_without_origin_is_closed_with_4401(finished_experiment, client):
    """Only a token lets a client without Origin in: browsers always send it."""
    assert await closed_with(socket(finished_experiment.pk, cookie_of(client))) == 4401


@run_async
async def test_no_credentials_at_all_is_closed_with_4401(finished_experiment):
    assert await closed_with(socket(finished_experiment.pk)) == 4401
    assert await closed_with(socket(finished_experiment.pk, OUR_ORIGIN)) == 4401


@run_async
async def test_an_unknown_token_is_closed_with_4401(finished_experiment):
    assert await closed_with(socket(finished_experiment.pk, bearer("eo_made-up"))) == 4401
    assert await closed_with(socket(finished_experiment.pk, query="?token=eo_made-up")) == 4401


@run_async
async def test_a_foreign_origin_is_refused_at_the_handshake_even_with_a_token(finished_experiment, api_token):
    communicator = socket(finished_experiment.pk, (b"origin", b"https://evil.example"), bearer(api_token))

    connected, _ = await communicator.connect(timeout=TIMEOUT)

    assert not connected


@run_async
async def test_another_users_session_is_closed_with_4404_and_joins_no_group(finished_experiment, other_client):
    code = await closed_with(socket(finished_experiment.pk, OUR_ORIGIN, cookie_of(other_client)))

    assert code == 4404
    assert not get_channel_layer().groups.get(group_name(finished_experiment.pk))


@run_async
async def test_another_users_token_is_closed_with_4404(finished_experiment, other_user):
    from asgiref.sync import sync_to_async

    from experiments.models import ApiToken

    _, token = await sync_to_async(ApiToken.issue)(other_user, "theirs")

    assert await closed_with(socket(finished_experiment.pk, bearer(token))) == 4404


@run_async
async def test_the_owners_browser_joins_the_experiments_group(ready_experiment, client):
    communicator = socket(ready_experiment.pk, OUR_ORIGIN, cookie_of(client))
    await communicator.connect(timeout=TIMEOUT)
    await communicator.receive_json_from(timeout=TIMEOUT)

    assert get_channel_layer().groups.get(group_name(ready_experiment.pk))
    await communicator.disconnect()


# -- the same under a real Daphne ------------------------------------------------------------


@pytest.fixture
def daphne_url(tmp_path):
    """Daphne alone (no worker) on the test database."""
    from tests.live import ROOT, free_port, test_database_url, wait_for_port

    port = free_port()
    env = {**os.environ, "DATABASE_URL": test_database_url(), "DJANGO_SETTINGS_MODULE": "edgeopt_site.settings",
           "EDGEOPT_STORAGE_ROOT": str(tmp_path)}
    log = open(tmp_path / "daphne.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                "edgeopt_site.asgi:application"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, process)
        yield f"ws://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
        print((tmp_path / "daphne.log").read_text(errors="replace")[-4000:])


@pytest.mark.slow
def test_under_daphne_a_token_script_without_origin_connects_and_others_are_told_why(
        daphne_url, finished_experiment, auth_headers):
    import json

    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = f"{daphne_url}/ws/experiments/{finished_experiment.pk}"
    with connect(url, additional_headers=auth_headers) as script:  # the library sends no Origin
        assert json.loads(script.recv(timeout=10))["status"] == "completed"

    with connect(url) as anonymous, pytest.raises(ConnectionClosed) as closed:
        anonymous.recv(timeout=10)
    assert closed.value.rcvd.code == 4401

    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin="https://evil.example", additional_headers=auth_headers)
    assert refused.value.response.status_code == 403
