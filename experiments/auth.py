"""Who is asking: API tokens and sessions, for the JSON API and the WebSocket.

HTTP: `api.api_view` asks `api_user` for the caller. A request that sends
`Authorization: Bearer <token>` is that token's user and needs no CSRF token (a browser
never adds that header to a cross-site request on its own); a request without it uses the
session, and then an unsafe method needs Django's CSRF token like any form.

WebSocket: `token_or_session_auth` puts the user in the scope (a token from `?token=` or
the Authorization header, else the session cookie), and `OriginOrTokenValidator` refuses a
browser from another site. Browsers always send `Origin` on a WebSocket; a script need not,
so a connection without one is let through only when a token authenticated it.
"""
from __future__ import annotations

from urllib.parse import parse_qs

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.security.websocket import AllowedHostsOriginValidator
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.contrib.auth.models import AnonymousUser
from django.middleware.csrf import CsrfViewMiddleware

from .models import ApiToken

# WebSocket close codes a client can act on (the 4000s are the application's own).
NOT_AUTHENTICATED = 4401
UNKNOWN_EXPERIMENT = 4404


class NotAuthenticated(Exception):
    """The request has no usable credentials; the message says what to send."""


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when there is no header.
    Raises NotAuthenticated for a header in another form."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthenticated("the Authorization header must be `Bearer <token>`")
    return token.strip()


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):
        return reason


def csrf_failure(request) -> str | None:
    """Why Django's CSRF check refuses this request, or None when it passes (the same check
    CsrfViewMiddleware makes for the pages; the API views are exempt from the middleware
    only so that token requests can skip it)."""
    check = _CsrfCheck(lambda request: None)
    check.process_request(request)
    return check.process_view(request, None, (), {})


def api_user(request):
    """The user an API request acts for, and whether a token said so. Raises NotAuthenticated."""
    token = bearer_token(request.META.get("HTTP_AUTHORIZATION", ""))
    if token is not None:
        user = ApiToken.user_for(token)
        if user is None:
            raise NotAuthenticated("the API token is unknown or was revoked; make a new one on the tokens page")
        return user, True
    if request.user.is_authenticated:
        return request.user, False
    raise NotAuthenticated("log in, or send `Authorization: Bearer <token>` with a token from the tokens page "
                           "or `manage.py create_api_token`")


# -- WebSocket -------------------------------------------------------------------------------


def websocket_token(scope) -> str | None:
    """A token from `?token=` or the Authorization header; None when neither is sent."""
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    if query.get("token"):
        return query["token"][0]
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            try:
                return bearer_token(value.decode("latin1")) or ""
            except NotAuthenticated:
                return ""  # a token was meant but is malformed: no user, and no session either
    return None


class TokenOrSessionAuthMiddleware(AuthMiddleware):
    """Channels' session AuthMiddleware, with an API token taking precedence when sent.
    Marks `scope["auth_method"]` "token" so the origin check can tell scripts from browsers."""

    async def resolve_scope(self, scope):
        token = websocket_token(scope)
        if token is None:
            scope["auth_method"] = "session"
            await super().resolve_scope(scope)
            return
        scope["auth_method"] = "token"
        user = await database_sync_to_async(ApiToken.user_for)(token) if token else None
        scope["user"]._wrapped = user or AnonymousUser()


def token_or_session_auth(inner):
    return CookieMiddleware(SessionMiddleware(TokenOrSessionAuthMiddleware(inner)))


class OriginOrTokenValidator:
    """A connection with an `Origin` must come from one of ALLOWED_HOSTS (Channels' own
    check: a foreign page is refused at the handshake). One without `Origin` is not a
    browser, so a cross-site page cannot be behind it; it goes on only when authenticated
    by an API token, and is otherwise closed with 4401 so the script learns what to send."""

    def __init__(self, application):
        self.application = application
        self.browser_check = AllowedHostsOriginValidator(application)

    async def __call__(self, scope, receive, send):
        if any(name == b"origin" for name, _ in scope.get("headers", [])):
            return await self.browser_check(scope, receive, send)
        if scope.get("auth_method") == "token" and scope["user"].is_authenticated:
            return await self.application(scope, receive, send)
        return await NotAuthenticatedRefusal.as_asgi()(scope, receive, send)


class NotAuthenticatedRefusal(AsyncWebsocketConsumer):
    async def connect(self):
        await self.accept()  # accepted first: a refused handshake carries no code
        await self.close(code=NOT_AUTHENTICATED)
