import os
import secrets
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from apps.accounts.models import Role, User
from apps.accounts.services import system_user, user_create


class Command(BaseCommand):
    help = (
        "Create the first admin with a random password if no admin exists, and write "
        "the credentials to a file readable only by the owner."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument(
            "--credentials-file", default=str(settings.BASE_DIR / "var" / "admin-credentials.txt")
        )

    def handle(self, *args, username: str, credentials_file: str, **options) -> None:
        path = Path(credentials_file)
        if User.objects.filter(role=Role.ADMIN, is_active=True, is_system=False).exists():
            hint = f" First-run credentials: {path}" if path.exists() else ""
            self.stdout.write(f"An admin already exists.{hint}")
            return
        password = secrets.token_urlsafe(18)
        user_create(actor=system_user(), username=username, role=Role.ADMIN, password=password)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"username: {username}\npassword: {password}\n")
        self.stdout.write(
            self.style.SUCCESS(
                f"Created the first admin {username!r}. Its password is in {path} "
                "(change it after logging in, then delete the file)."
            )
        )
