from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.audit.checkpoints import checkpoints_verify
from apps.audit.selectors import audit_chain_verify
from apps.audit.signing import public_key


class Command(BaseCommand):
    help = (
        "Verify the audit log's hash chain from the first event, naming the first broken "
        "link, then the database against the newest signed checkpoint of its head."
    )

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
        report = checkpoints_verify(path=settings.AUDIT_CHECKPOINT_FILE, key=public_key())
        if not report.ok:
            raise CommandError("Audit checkpoints FAILED: " + "; ".join(report.problems) + ".")
        if report.newest is None:
            self.stdout.write(f"No checkpoints yet in {report.path}: nothing to compare.")
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Checkpoints OK: {report.lines} signed; the newest ({report.newest.at}) "
                f"names event #{report.newest.seq}, which is in the log unchanged."
            )
        )
