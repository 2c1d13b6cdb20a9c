from django.urls import path

from .consumers import ExperimentConsumer

websocket_urlpatterns = [
    path("ws/experiments/<int:experiment_id>", ExperimentConsumer.as_asgi()),
]
