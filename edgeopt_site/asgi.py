"""HTTP and WebSocket entry point (Daphne)."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "edgeopt_site.settings")
# Set up Django before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from edgeopt_site.body_limits import BodyLimitMiddleware, install_daphne_request_class  # noqa: E402
from experiments.auth import OriginOrTokenValidator, token_or_session_auth  # noqa: E402
from experiments.routing import websocket_urlpatterns  # noqa: E402

# Under Daphne the body is read before the application is called, so the limit must be
# applied in Daphne's request class too (see body_limits).
install_daphne_request_class()

application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(django_asgi_app),
        # The user first (token or session), then the origin check, which lets a client
        # without Origin through only when a token authenticated it.
        "websocket": token_or_session_auth(OriginOrTokenValidator(URLRouter(websocket_urlpatterns))),
    }
)
