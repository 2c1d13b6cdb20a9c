from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("experiments.account_urls")),
    path("", include("experiments.urls")),
]

# Unknown /api/ paths answer JSON like the rest of the API.
handler404 = "experiments.api.not_found"
handler400 = "experiments.api.bad_request"
