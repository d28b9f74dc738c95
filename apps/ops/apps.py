from django.apps import AppConfig


class OpsConfig(AppConfig):
    """Operations: usage retention, the dashboard's figures and Prometheus metrics."""

    name = "apps.ops"
    label = "ops"
    default_auto_field = "django.db.models.BigAutoField"
