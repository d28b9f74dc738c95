"""Issue, revoke and list the credentials of serving workers on other hosts."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.services import system_user
from apps.deployments import credentials, selectors


class Command(BaseCommand):
    help = (
        "Worker credentials (docs/operator-guide.md, 'Adding a worker on another host'): "
        "'issue NAME' prints a new secret once; 'revoke NAME' revokes the name's active "
        "credential; 'list' shows them all. Acts as the system user; each change is audited."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("action", choices=["issue", "revoke", "list"])
        parser.add_argument("name", nargs="?", default="")

    def handle(self, *args, action: str, name: str, **options) -> None:
        if action == "list":
            for credential in selectors.worker_credential_list():
                used = credential.last_used_at.isoformat() if credential.last_used_at else "never"
                self.stdout.write(
                    f"{credential.name}\t{credential.status}\t"
                    f"issued {credential.created_at.isoformat()}\tlast used {used}"
                )
            return
        if not name:
            raise CommandError(f"Name the worker: worker_credential {action} NAME")
        actor = system_user()
        if action == "issue":
            try:
                issued = credentials.worker_credential_issue(actor=actor, name=name)
            except ValidationError as exc:
                raise CommandError(" ".join(exc.messages)) from exc
            # The secret alone on stdout, so a script can capture it; it is not kept.
            self.stderr.write(
                f"Issued a worker credential for {name}. Set it as AIBOX_WORKER_TOKEN on "
                "the worker; it is shown only now."
            )
            self.stdout.write(issued.secret)
            return
        credential = selectors.worker_credential_list().active().filter(name=name).first()
        if credential is None:
            raise CommandError(f"No active worker credential is named {name!r}.")
        credentials.worker_credential_revoke(actor=actor, credential=credential)
        self.stdout.write(f"Revoked the worker credential {name}.")
