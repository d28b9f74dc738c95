from django.core.management.base import BaseCommand, CommandError

from apps.audit.selectors import audit_chain_verify


class Command(BaseCommand):
    help = "Verify the audit log's hash chain from the first event; name the first broken link."

    def handle(self, *args, **options) -> None:
        result = audit_chain_verify()
        if not result.ok:
            raise CommandError(
                f"Audit chain BROKEN at {result.error} "
                f"({result.checked} events verified before it)."
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"Audit chain OK: {result.checked} events verified; head hash {result.last_hash}."
            )
        )
