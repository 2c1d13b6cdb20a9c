"""WS /ws/experiments/{id}: the experiment's progress, live.

Why polling: the worker is another process (django-q2), and the default setup's in-memory
channel layer does not cross processes. The `experiment_progress` row is the truth: the
consumer sends it on connect (a reload or a late join is right at once) and then watches
its `seq`, which grows on every write, sending each change, and whether the worker still
shows signs of life (a dead worker changes nothing, so that is watched too). It also joins
the group `experiment_<id>`: with CHANNEL_LAYER=redis the worker's push wakes every web
process at once, and the poll (EDGEOPT_PROGRESS_POLL_MS) is only a slow safety net, or off.

?format=html sends the monitor's partial (stable id, hx-swap-oob) instead of JSON, for
htmx's ws extension.

Who may connect is settled before this consumer (auth.token_or_session_auth and
auth.OriginOrTokenValidator in asgi.py); here an anonymous user is closed with 4401, and
an experiment that is not in the user's `visible_experiments` with 4404.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from . import services
from .attempts import worker_silence_s
from .auth import NOT_AUTHENTICATED, UNKNOWN_EXPERIMENT
from .models import Experiment, ExperimentProgress
from .sink import group_name


class ExperimentConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.experiment_id = int(self.scope["url_route"]["kwargs"]["experiment_id"])
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.as_html = query.get("format") == ["html"]
        self.last_seen = None  # (seq, worker silent) of the last message sent
        self.poller = None
        self.lock = asyncio.Lock()
        await self.accept()
        # Accept first so the client receives the code (a refused handshake has none).
        if not self.scope["user"].is_authenticated:
            await self.close(code=NOT_AUTHENTICATED)
            return
        if not await self._exists():  # unknown, or another user's: the same answer
            await self.close(code=UNKNOWN_EXPERIMENT)
            return
        # Joined only after the ownership check.
        self.group = group_name(self.experiment_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        finished = await self.send_if_changed()
        if not finished and settings.EDGEOPT_PROGRESS_POLL_MS:
            self.poller = asyncio.create_task(self.poll(settings.EDGEOPT_PROGRESS_POLL_MS / 1000))

    async def disconnect(self, code):
        if self.poller:
            self.poller.cancel()
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def poll(self, interval: float):
        while not await self.send_if_changed():
            await asyncio.sleep(interval)

    async def experiment_changed(self, event):
        """A push from the worker through a real channel layer: look now, not at the next poll."""
        await self.send_if_changed()

    async def send_if_changed(self) -> bool:
        """Send the state if it changed since the last send; True once it is final."""
        async with self.lock:
            seen, finished, payload = await self._snapshot(self.last_seen)
            if seen is None:  # deleted while we watched
                await self.close(code=UNKNOWN_EXPERIMENT)
                return True
            if payload is not None:
                self.last_seen = seen
                await self.send(text_data=payload)
            return finished

    @database_sync_to_async
    def _exists(self) -> bool:
        return services.visible_experiments(self.scope.get("user")).filter(pk=self.experiment_id).exists()

    @database_sync_to_async
    def _snapshot(self, last_seen) -> tuple[tuple | None, bool, str | None]:
        """((seq, worker silent), finished, payload or None when nothing changed); None first
        when the experiment is gone. One cheap query (two while queued) while nothing changes."""
        row = Experiment.objects.filter(pk=self.experiment_id).values(
            "status", "heartbeat_at", "started_at", "progress__seq", "progress__status").first()
        if row is None:
            return None, True, None
        if row["progress__seq"] is None:
            ExperimentProgress.publish(Experiment.objects.get(pk=self.experiment_id), status=row["status"])
        silent = worker_silence_s(row["status"], row["heartbeat_at"], row["started_at"]) is not None
        finished = row["progress__status"] in Experiment.FINISHED
        if (row["progress__seq"], silent) == last_seen:
            return last_seen, finished, None
        experiment = Experiment.objects.select_related("progress").get(pk=self.experiment_id)
        seen = (experiment.progress.seq, silent)
        if self.as_html:
            from .views import render_progress

            return seen, experiment.progress.is_finished, render_progress(experiment)
        message = experiment.progress.to_message()
        return seen, message["status"] in Experiment.FINISHED, json.dumps(message)
