from django.apps import AppConfig


class FinetuneConfig(AppConfig):
    name = "apps.finetune"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, not at the top: models load only once the app registry is ready.
        from apps.finetune.selectors import finetune_training_licences
        from apps.registry.licences import training_licences_source

        # The registry sits below this app and cannot import it: it is handed the reader.
        training_licences_source(finetune_training_licences)
