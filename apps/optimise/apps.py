from django.apps import AppConfig


class OptimiseConfig(AppConfig):
    name = "apps.optimise"
    label = "optimise"
