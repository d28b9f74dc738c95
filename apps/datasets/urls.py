from django.urls import path

from apps.datasets import views

app_name = "datasets"

# "versions" and "imports" are reserved dataset names (services.RESERVED_NAMES), so these
# come first.
urlpatterns = [
    path("", views.dataset_list, name="list"),
    path("versions/<int:pk>/", views.version_detail, name="version"),
    path("versions/<int:pk>/rows", views.version_rows, name="rows"),
    path("versions/<int:pk>/derive/<str:operation>", views.version_derive, name="derive"),
    path("versions/<int:pk>/export.csv", views.version_export, name="export"),
    path("imports/<int:pk>/", views.dataset_import_detail, name="import"),
    path("<str:name>/", views.dataset_detail, name="detail"),
    path("<str:name>/upload", views.version_upload, name="upload"),
    path("<str:name>/import-hf", views.dataset_import_create, name="import_hf"),
]
