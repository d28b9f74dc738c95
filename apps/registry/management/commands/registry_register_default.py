from django.core.management.base import BaseCommand

from apps.accounts.services import system_user
from apps.registry.bundled import model_register_bundled


class Command(BaseCommand):
    help = "Register and approve the bundled Gemma 3 270M model (once; later runs do nothing)."

    def handle(self, *args, **options) -> None:
        self.stdout.write("Registering the bundled default model (Gemma 3 270M)…")
        result = model_register_bundled(actor=system_user())
        version = result.version
        state = "registered" if result.created else "already registered"
        self.stdout.write(
            self.style.SUCCESS(
                f"{version} {state}: sha256 {version.sha256}, {version.size / 1e6:.0f} MB, "
                f"{version.architecture} {version.quantization}, {version.state}."
            )
        )
