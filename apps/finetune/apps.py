from django.apps import AppConfig


class FinetuneConfig(AppConfig):
    name = "apps.finetune"
    default_auto_field = "django.db.models.BigAutoField"
