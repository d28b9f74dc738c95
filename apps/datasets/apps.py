from django.apps import AppConfig


class DatasetsConfig(AppConfig):
    name = "apps.datasets"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, not at the top: models load only once the app registry is ready.
        from apps.datasets.selectors import artifact_users
        from apps.registry.artifacts import artifact_users_source

        # The registry sits below this app and cannot import it: it is handed the reader.
        artifact_users_source(artifact_users)
