from django.urls import path

from apps.inference import pages

# Mounted at /usage/ (aibox/urls.py); the OpenAI-compatible routes are in urls.py.
app_name = "inference"

urlpatterns = [
    path("", pages.usage, name="usage"),
    path("export.csv", pages.usage_export, name="usage_export"),
    # A deployment's latest requests, loaded by its page (apps.deployments).
    path("deployments/<str:name>/", pages.deployment_usage, name="deployment_usage"),
]
