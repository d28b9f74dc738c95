"""The provenance pages, mounted by aibox/urls.py under the names their links have always
used: the audit log, its reports and model dossiers at /audit/ (``audit:…``), and a
version's lineage and ML-BOM beside its registry page (``registry:lineage``,
``registry:bom``). The API views are in aibox/urls.py's ``api_v1``."""

from django.urls import path

from apps.provenance import views

audit_urlpatterns = [
    path("", views.audit_list, name="list"),
    path("export.<str:fmt>", views.audit_export, name="export"),
    path("public-key.pem", views.public_key_pem, name="public_key"),
    path("report/", views.audit_report, name="report"),
    path("models/<int:pk>/", views.model_dossier, name="dossier"),
]

registry_urlpatterns = [
    path("versions/<int:pk>/lineage", views.version_lineage_page, name="lineage"),
    path("versions/<int:pk>/bom.cdx.json", views.version_bom, name="bom"),
]
