from django.urls import path

from apps.audit import views

app_name = "audit"

urlpatterns = [
    path("", views.audit_list, name="list"),
    path("export.<str:fmt>", views.audit_export, name="export"),
    path("public-key.pem", views.public_key_pem, name="public_key"),
    path("report/", views.audit_report, name="report"),
    path("models/<int:pk>/", views.model_dossier, name="dossier"),
]
