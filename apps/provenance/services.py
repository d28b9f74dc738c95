"""The provenance documents a user asks for: each is audited, in its own transaction,
before it is built (the signed ones carry their audit event's number)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import transaction

from apps.accounts.models import User
from apps.accounts.services import require_role
from apps.audit.chain import format_timestamp
from apps.audit.exports import ExportPlan
from apps.audit.selectors import AuditFilters
from apps.audit.services import audit_export_begin, audit_record
from apps.provenance.bom import lineage_bom
from apps.provenance.lineage import version_lineage
from apps.provenance.reports import compliance_report, model_dossier, signed_json, signed_pdf
from apps.provenance.selectors import AUDIT_READER_ROLES
from apps.registry.models import ModelVersion


def audit_export_start(*, actor: User, filters: AuditFilters, fmt: str) -> ExportPlan:
    """Begin an export of a filtered view of the audit log (``audit_export_begin``), for
    the roles that read the log. The audit app sits below accounts and knows no roles, so
    the check is here."""
    require_role(actor, AUDIT_READER_ROLES, "export the audit log")
    return audit_export_begin(actor=actor, filters=filters, fmt=fmt)


def audit_report_generate(*, actor: User, start: datetime, end: datetime, fmt: str) -> bytes:
    """The signed compliance report for [start, end) as JSON or PDF; audited."""
    require_role(actor, AUDIT_READER_ROLES, "read compliance reports")
    with transaction.atomic():
        event = audit_record(
            actor=actor,
            action="audit.report",
            details={"format": fmt, "start": format_timestamp(start), "end": format_timestamp(end)},
        )
    document = compliance_report(start=start, end=end)
    render = signed_json if fmt == "json" else signed_pdf
    return render(
        "compliance-report", document, generated_by=event.actor_label, event_seq=event.seq
    )


def audit_dossier_generate(*, actor: User, version: ModelVersion, fmt: str) -> bytes:
    """The signed dossier of one model version as JSON or PDF; audited."""
    require_role(actor, AUDIT_READER_ROLES, "read model dossiers")
    with transaction.atomic():
        event = audit_record(
            actor=actor, action="audit.dossier", target=version, details={"format": fmt}
        )
    render = signed_json if fmt == "json" else signed_pdf
    return render(
        "model-dossier",
        model_dossier(version=version),
        generated_by=event.actor_label,
        event_seq=event.seq,
    )


@transaction.atomic
def model_version_bom(
    *, actor: User, version: ModelVersion, absolute: Callable[[str], str]
) -> dict[str, Any]:
    """The CycloneDX ML-BOM of ``version`` and what it was made from, as ``actor`` may see
    it; the export is audited. ``absolute`` makes a path an absolute URL."""
    bom = lineage_bom(version_lineage(user=actor, version=version), absolute=absolute)
    audit_record(
        actor=actor,
        action="model_version.bom_export",
        target=version,
        details={
            "serial_number": bom["serialNumber"],
            "components": [c["bom-ref"] for c in bom["components"]],
        },
    )
    return bom
