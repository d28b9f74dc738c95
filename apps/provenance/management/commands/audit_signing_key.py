from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.services import system_user
from apps.audit.services import audit_signing_key_create
from apps.audit.signing import SigningKeyMissing, public_key


class Command(BaseCommand):
    help = (
        "Show the audit signing key's fingerprint; --create makes the box's first key "
        "(audited), --replace-lost-key a new one when the old file is gone for good."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--create", action="store_true", help="Create the key if there is none (audited)."
        )
        parser.add_argument(
            "--replace-lost-key",
            action="store_true",
            help="Create a new key although the log records an earlier one (audited).",
        )

    def handle(self, *args, create: bool, replace_lost_key: bool, **options) -> None:
        path = settings.AUDIT_SIGNING_KEY_FILE
        if (create or replace_lost_key) and not path.exists():
            try:
                key = audit_signing_key_create(
                    actor=system_user(), replace_lost_key=replace_lost_key
                )
            except ValidationError as exc:
                raise CommandError(" ".join(exc.messages)) from exc
            self.stdout.write(f"Created the audit signing key {path}: sha256 {key.fingerprint}.")
            self.stdout.write("Back it up with the secret key (docs/operator-guide.md, Backups).")
            return
        try:
            key = public_key()
        except SigningKeyMissing as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Audit signing key {path}: sha256 {key.fingerprint}.")
