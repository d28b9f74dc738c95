from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.services import system_user
from apps.core.database import AppRoleError, app_role_grant, app_role_url


class Command(BaseCommand):
    help = (
        "Create or update the database role the running app connects as "
        "(AIBOX_DATABASE_APP_ROLE, AIBOX_DATABASE_APP_PASSWORD): rows only, no schema "
        "changes, append-only on the audit log. Run it as the tables' owner after migrate."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--print-url",
            action="store_true",
            help="Print only the app's DATABASE_URL (with its password) on stdout; "
            "nothing when AIBOX_DATABASE_APP_ROLE is empty.",
        )

    def handle(self, *args, print_url: bool, **options) -> None:
        role = settings.DATABASE_APP_ROLE
        password = settings.DATABASE_APP_PASSWORD
        if not role:
            if not print_url:  # bin/aibox keeps the owner's URL when nothing is printed
                self.stdout.write(
                    "AIBOX_DATABASE_APP_ROLE is empty: the app connects as the tables' owner."
                )
            return
        try:
            result = app_role_grant(actor=system_user(), role=role, password=password)
        except AppRoleError as exc:
            raise CommandError(str(exc)) from exc
        if print_url:
            self.stdout.write(app_role_url(role=role, password=password))
            return
        done = "created" if result.created else ("updated" if result.changed else "unchanged")
        self.stdout.write(f"Database role {role!r} {done}: rows only, audit log append-only.")
