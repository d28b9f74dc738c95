from django.urls import path

from apps.registry import views

# Mounted at /registry/ as the "registry" namespace by aibox/urls.py, which adds a
# version's lineage and ML-BOM pages (apps.provenance) to these.

urlpatterns = [
    path("", views.repo_list, name="repos"),
    path("models/<str:name>/", views.repo_detail, name="repo"),
    path("models/<str:name>/upload", views.version_upload, name="upload"),
    path("models/<str:name>/import-path", views.version_import_path, name="import_path"),
    path("models/<str:name>/import-hf", views.model_import_create, name="import_hf"),
    path("imports/<int:pk>/", views.model_import_detail, name="import"),
    path("versions/<int:pk>/", views.version_detail, name="version"),
]
