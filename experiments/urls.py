from django.urls import path

from . import api, views

app_name = "experiments"

urlpatterns = [
    # pages
    path("", views.setup, name="setup"),
    path("experiments/<int:experiment_id>/", views.monitor, name="monitor"),
    path("experiments/", views.experiment_list, name="list"),
    path("experiments/<int:experiment_id>/stop", views.stop, name="stop"),
    path("experiments/<int:experiment_id>/rerun", views.rerun, name="rerun"),
    path("experiments/<int:experiment_id>/resume", views.resume, name="resume"),
    path("experiments/<int:experiment_id>/results/", views.results, name="results"),
    # JSON API
    path("api/catalog", api.catalog_view, name="api-catalog"),
    path("api/experiments", api.experiment_list, name="api-list"),
    path("api/experiments/create", api.experiment_create, name="api-create"),
    path("api/experiments/<int:experiment_id>", api.experiment_detail, name="api-detail"),
    path("api/experiments/<int:experiment_id>/upload", api.experiment_upload, name="api-upload"),
    path("api/experiments/<int:experiment_id>/start", api.experiment_start, name="api-start"),
    path("api/experiments/<int:experiment_id>/stop", api.experiment_stop, name="api-stop"),
    path("api/experiments/<int:experiment_id>/results", api.experiment_results, name="api-results"),
    path("api/experiments/<int:experiment_id>/recommendation", api.experiment_recommendation,
         name="api-recommendation"),
    # <path:> so that any technique text, slashes included, reaches the view's check.
    path("api/experiments/<int:experiment_id>/download/<path:technique>", api.experiment_download,
         name="api-download"),
    path("api/experiments/<int:experiment_id>/bundle/<path:technique>", api.experiment_bundle,
         name="api-bundle"),
]
