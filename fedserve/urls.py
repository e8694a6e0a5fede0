from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("fedserve.api.urls")),
]

# Unknown paths below /api/ get a JSON error body like every other API error.
handler404 = "fedserve.api.errors.page_not_found"
