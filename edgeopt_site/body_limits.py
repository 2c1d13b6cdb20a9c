"""Refuse request bodies over the limit before they are read.

Daphne cannot do this through ASGI alone: Twisted spools the whole body to a temporary file,
and only then does Daphne call the application, pushing every chunk of the file into its
in-memory queue at once (a 2 GiB POST grew the web process to 19 GiB). So the limit is
applied twice:

- `BodyLimitedRequest`, Daphne's request class with two hooks of Twisted's: `gotLength`
  answers 413 as soon as the headers declare too long a body, and `handleContentChunk` counts
  a chunked body and answers 413 once it passes the limit. Either way nothing more is read
  or stored; the socket is paused (so the client sees the answer) and then closed.
- `BodyLimitMiddleware`, the same rule in ASGI terms, for servers that stream the body to the
  application as it arrives (uvicorn, hypercorn, Django's test client).

The limit: multipart bodies (uploads) may carry `EDGEOPT_MAX_UPLOAD_MB` plus room for the form
fields; any other body Django's `DATA_UPLOAD_MAX_MEMORY_SIZE`.
"""
from __future__ import annotations

import json

from django.conf import settings

FORM_FIELDS_SLACK = 64 * 1024
# How long a refused connection stays open (paused) so the client can read the 413.
CLOSE_AFTER_S = 2.0


def body_limit(content_type: str) -> int:
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        return settings.EDGEOPT_MAX_UPLOAD_MB * 2**20 + FORM_FIELDS_SLACK
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def refusal(limit: int) -> bytes:
    """The 413 body: JSON like every API error, with the limit in words."""
    if limit >= 2**20:
        words = f"{limit // 2**20} MB"
    else:
        words = f"{limit // 1024} KB"
    return json.dumps({"error": f"the request body is larger than the {words} this server takes; "
                                f"upload a smaller file (the upload limit is EDGEOPT_MAX_UPLOAD_MB)"}).encode()


def install_daphne_request_class() -> None:
    """Make Daphne build `BodyLimitedRequest`s: its HTTP factory reads the module's
    `WebRequest` name for every new connection."""
    from daphne import http_protocol

    if not issubclass(http_protocol.WebRequest, _body_limited_request_class()):
        http_protocol.WebRequest = _body_limited_request_class()


_request_class = None


def _body_limited_request_class():
    global _request_class
    if _request_class is not None:
        return _request_class
    from daphne.http_protocol import WebRequest

    class BodyLimitedRequest(WebRequest):
        refused = False
        received = 0

        def _limit(self) -> int:
            content_type = self.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
            return body_limit(content_type.decode("latin-1"))

        def _refuse(self, limit: int) -> None:
            # Imported here: importing the reactor early would install Twisted's default one
            # before Daphne installs its asyncio reactor.
            from twisted.internet import reactor

            self.refused = True
            body = refusal(limit)
            transport = self.channel.transport
            transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\n"
                            b"Content-Type: application/json\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                            b"Connection: close\r\n\r\n" + body)
            transport.pauseProducing()  # read nothing more of the body
            reactor.callLater(CLOSE_AFTER_S, transport.loseConnection)

        def gotLength(self, length):
            limit = self._limit()
            if length is not None and length > limit:
                self._refuse(limit)
                return
            super().gotLength(length)

        def handleContentChunk(self, data):
            if self.refused:
                return
            self.received += len(data)
            limit = self._limit()
            if self.received > limit:
                self.content.close()  # an anonymous temporary file: closing it frees it
                self._refuse(limit)
                return
            super().handleContentChunk(data)

        def requestReceived(self, command, path, version):
            if not self.refused:
                super().requestReceived(command, path, version)

    _request_class = BodyLimitedRequest
    return _request_class


class BodyLimitMiddleware:
    """ASGI: 413 before reading when Content-Length is over the limit; while a streamed body
    arrives, 413 as soon as it passes the limit, without keeping what came."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        limit = body_limit(headers.get(b"content-type", b"").decode("latin-1"))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_413(send, limit)

        received = 0
        too_large = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    # The application sees the end of an empty body; the 413 replaces its answer.
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        started = False

        async def guarded_send(message):
            nonlocal started
            if too_large:
                if not started:
                    started = True
                    await _send_413(send, limit)
                return
            started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _send_413(send, limit: int) -> None:
    body = refusal(limit)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
