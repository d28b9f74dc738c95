import os
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.models import Role, Scope, User
from apps.accounts.services import ApiKeyRejected, api_key_authenticate, api_key_create, system_user
from apps.deployments import selectors, services
from apps.deployments.models import Deployment, State
from apps.registry.bundled import BUNDLED_REPO
from apps.registry.models import ModelRepo

DEFAULT_NAME = "gemma-3-270m"


class Command(BaseCommand):
    help = (
        "Deploy the bundled model (once), optionally wait until it is ready, and keep an "
        "inference API key for the first admin in a file readable only by the owner."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", default=DEFAULT_NAME)
        parser.add_argument("--wait", type=float, default=0, help="Seconds to wait for ready.")
        parser.add_argument("--key-file", default=str(settings.BASE_DIR / "var" / "api-key.txt"))

    def handle(self, *args, name: str, wait: float, key_file: str, **options) -> None:
        actor = system_user()
        deployment = Deployment.objects.filter(name=name).first()
        if deployment is None:
            repo = ModelRepo.objects.filter(name=BUNDLED_REPO).first()
            version = repo and repo.versions.order_by("-number").first()
            if version is None:
                raise CommandError("Register the bundled model first (registry_register_default).")
            deployment = services.deployment_create(
                actor=actor,
                name=name,
                model_version=version,
                context_length=2048,
                # Continuous batching: eight requests decode together, eight more wait.
                parallel_slots=8,
                queue_size=16,
            )
            self.stdout.write(f"Deployment {name} created ({deployment.get_state_display()}).")
        self._ensure_key(Path(key_file), name)
        if wait > 0:
            self._wait(deployment, wait)

    def _ensure_key(self, path: Path, name: str) -> None:
        if path.exists():
            try:
                api_key_authenticate(raw_key=path.read_text().strip())
                return
            except ApiKeyRejected:
                pass
        admin = User.objects.filter(role=Role.ADMIN, is_active=True, is_system=False).first()
        if admin is None:
            return
        issued = api_key_create(
            actor=system_user(), owner=admin, name="bin/aibox run", scopes=[Scope.INFERENCE]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(issued.secret + "\n")
        self.stdout.write(f"An inference API key for {admin.username} is in {path}.")

    def _wait(self, deployment: Deployment, timeout: float) -> None:
        if not deployment.running:
            # An admin stopped it on purpose: report it and carry on, never restart it.
            self.stdout.write(
                f"  {deployment.name}: stopped by an admin; not starting it (start it on the "
                "Deployments page)."
            )
            return
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            deployment.refresh_from_db()
            serving = deployment.state == State.READY and selectors.replicas_serving(
                deployment.replica_set.all()
            )
            if deployment.state == State.READY and not serving:
                line = "Waiting for a worker to load it"  # the database remembers the last run
            else:
                line = deployment.get_state_display() + (
                    f": {deployment.state_reason}" if deployment.state_reason else ""
                )
            if line != last:
                self.stdout.write(f"  {deployment.name}: {line}")
                last = line
            if serving:
                return
            if deployment.state == State.FAILED:
                # The web UI is where an admin fixes it: report it, and let AIBox run.
                self.stderr.write(
                    f"  {deployment.name} failed: {deployment.state_reason} AIBox keeps "
                    "running; see the Deployments page."
                )
                return
            time.sleep(0.5)
        raise CommandError(f"{deployment.name} was not ready after {timeout:.0f} s.")
