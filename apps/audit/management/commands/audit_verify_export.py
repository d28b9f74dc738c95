import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.core.management.base import BaseCommand, CommandError

from apps.audit import signing
from apps.audit.verification import verify_export


def _public_key(value: str | None) -> bytes:
    """The box's own key, or one given as a PEM file or base64 of the raw 32 bytes."""
    if not value:
        return signing.public_key().raw
    path = Path(value)
    if path.is_file():
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise CommandError(f"{value} is not an Ed25519 public key.")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise CommandError("--public-key: give a PEM file or base64 of 32 bytes.") from exc
    if len(raw) != 32:
        raise CommandError("--public-key: an Ed25519 public key is 32 bytes.")
    return raw


class Command(BaseCommand):
    help = (
        "Verify a signed audit export, compliance report or model dossier: its signature, "
        "its content hash and, for CSV and JSON Lines, every event's hash and link."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", help="the downloaded export (.csv, .jsonl, .pdf, .json)")
        parser.add_argument(
            "--public-key",
            help="PEM file or base64 public key to check against (default: this box's key)",
        )

    def handle(self, *args, **options) -> None:
        path = Path(options["file"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}.") from exc
        report = verify_export(data, public_key=_public_key(options["public_key"]))
        if not report.ok:
            problems = "\n".join(f"  - {problem}" for problem in report.problems)
            raise CommandError(f"{path}: verification FAILED:\n{problems}")
        manifest = report.manifest
        lines = [f"{path}: OK, signature and content verify ({report.format})."]
        if manifest.get("kind") == "audit-events":
            first, last = manifest.get("first_event"), manifest.get("last_event")
            lines.append(f"  events: {manifest['events']}")
            if first and last:
                lines.append(f"  first: #{first['seq']} {first['hash']}")
                lines.append(f"  last:  #{last['seq']} {last['hash']}")
            verified = manifest.get("verified_range")
            if verified:
                lines.append(
                    f"  chain verified by the box over #{verified['first_seq']}.."
                    f"#{verified['last_seq']} ({verified['events_checked']} events)"
                )
        else:
            lines.append(f"  {manifest.get('kind')} generated {manifest.get('generated_at')}")
        self.stdout.write(self.style.SUCCESS("\n".join(lines)))
