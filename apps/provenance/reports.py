"""The compliance report for a period and the model dossier, as plain JSON-ready dicts,
and their signed JSON and PDF renderings (apps.audit.signed's formats).

Both read the audit log where the history lives there (who changed what, when) and the
current rows for what stands now (licences, approvals, findings, deployments, usage).
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime
from typing import Any

from django.db.models import Count, Q, Sum

from apps.audit import signing
from apps.audit.chain import canonical_json, format_timestamp
from apps.audit.models import AuditEvent
from apps.audit.signed import JSON_MANIFEST_KEY, manifest_bytes, trailer_line
from apps.datasets.models import DatasetVersion
from apps.deployments.models import Deployment
from apps.finetune.models import FineTuneJob
from apps.inference.models import UsageRecord
from apps.registry.models import ModelVersion

REPORT_VERSION = 1


def _ts(value: datetime | None) -> str | None:
    return format_timestamp(value) if value else None


def _events(q: Q, start: datetime, end: datetime) -> list[dict[str, Any]]:
    qs = AuditEvent.objects.filter(q, created_at__gte=start, created_at__lt=end).order_by("seq")
    return [
        {
            "seq": e.seq,
            "at": _ts(e.created_at),
            "actor": e.actor_label,
            "action": e.action,
            "target": e.target_label or f"{e.target_type} {e.target_id}".strip(),
            "outcome": e.outcome,
            "details": e.details,
        }
        for e in qs
    ]


def _usage_totals(qs, key: str) -> list[dict[str, Any]]:
    rows = (
        qs.values(key)
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=~Q(outcome="ok")),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
        .order_by(key)
    )
    return [
        {
            key: row[key] or "(none)",
            "requests": row["requests"],
            "errors": row["errors"],
            "prompt_tokens": row["prompt_tokens"] or 0,
            "completion_tokens": row["completion_tokens"] or 0,
        }
        for row in rows
    ]


def compliance_report(*, start: datetime, end: datetime) -> dict[str, Any]:
    """What happened on the box from ``start`` (inclusive) to ``end`` (exclusive)."""
    usage = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
    head = AuditEvent.objects.filter(created_at__lt=end).order_by("-seq").first()
    return {
        "period": {"start": _ts(start), "end": _ts(end)},
        "audit_log": {
            "events_in_period": AuditEvent.objects.filter(
                created_at__gte=start, created_at__lt=end
            ).count(),
            "head_seq_at_end": head.seq if head else 0,
            "head_hash_at_end": head.hash if head else None,
        },
        "user_changes": _events(Q(action__startswith="user."), start, end),
        "api_keys": _events(Q(action__startswith="apikey."), start, end),
        "models": [
            {
                "version": str(v),
                "id": v.pk,
                "sha256": v.artifact_id,
                "licence": v.repo.licence,
                "state": v.state,
                "state_changed_at": _ts(v.state_changed_at),
                "state_reason": v.state_reason,
                "source": v.source_kind,
                "created_at": _ts(v.created_at),
            }
            for v in ModelVersion.objects.select_related("repo").order_by("repo__name", "number")
        ],
        "approvals": _events(
            Q(action__startswith="model_version.") & ~Q(action="model_version.create"),
            start,
            end,
        ),
        "datasets_with_personal_data": [
            {
                "version": str(d),
                "id": d.pk,
                "licence": d.dataset.licence,
                "rows": d.rows,
                "rows_with_personal_data": d.pii_rows,
                "state": d.state,
                "created_at": _ts(d.created_at),
            }
            for d in DatasetVersion.objects.select_related("dataset")
            .filter(pii_rows__gt=0)
            .order_by("dataset__name", "number")
        ],
        "finetunes": [
            {
                "id": job.pk,
                "name": job.name,
                "base_model": str(job.base_model),
                "dataset": str(job.dataset_version),
                "state": job.state,
                "created_at": _ts(job.created_at),
                "finished_at": _ts(job.finished_at),
            }
            for job in FineTuneJob.objects.select_related(
                "base_model__repo", "dataset_version__dataset"
            )
            .filter(created_at__lt=end)
            .filter(Q(finished_at__isnull=True) | Q(finished_at__gte=start))
            .order_by("created_at")
        ],
        "deployments": [
            {
                "name": d.name,
                "model": str(d.model_version),
                "adapter": str(d.adapter) if d.adapter_id else None,
                "state": d.state,
                "created_at": _ts(d.created_at),
            }
            for d in Deployment.objects.select_related(
                "model_version__repo", "adapter__repo"
            ).order_by("name")
        ],
        "deployment_changes": _events(Q(action__startswith="deployment."), start, end),
        "usage_per_key": _usage_totals(usage, "api_key_prefix"),
        "usage_per_deployment": _usage_totals(usage, "deployment_name"),
        "licence_overrides": _events(Q(action__icontains="licence_override"), start, end),
    }


def _ancestors(version: ModelVersion) -> list[dict[str, Any]]:
    """Every parent, grandparent... of ``version``, each once, nearest first."""
    seen = {version.pk}
    todo = [(version, 0)]
    out = []
    while todo:
        current, depth = todo.pop(0)
        for parent in current.parents.select_related("repo").order_by("pk"):
            if parent.pk in seen:
                continue
            seen.add(parent.pk)
            out.append(
                {
                    "version": str(parent),
                    "id": parent.pk,
                    "child_id": current.pk,
                    "depth": depth + 1,
                    "sha256": parent.artifact_id,
                    "licence": parent.repo.licence,
                    "state": parent.state,
                    "source": parent.source_kind,
                }
            )
            todo.append((parent, depth + 1))
    return out


def model_dossier(*, version: ModelVersion) -> dict[str, Any]:
    """Everything known about one model version: provenance, approvals, deployments,
    usage."""
    ancestors = _ancestors(version)
    deployments = Deployment.objects.filter(Q(model_version=version) | Q(adapter=version))
    # Requests this version answered, as the base model or as the adapter on top of one.
    usage = UsageRecord.objects.filter(
        Q(model_sha256=version.artifact_id) | Q(adapter_sha256=version.artifact_id)
    )
    produced_by = [
        {
            "id": job.pk,
            "name": job.name,
            "base_model": str(job.base_model),
            "dataset": str(job.dataset_version),
            "state": job.state,
            "params": job.params,
        }
        for job in FineTuneJob.objects.select_related(
            "base_model__repo", "dataset_version__dataset"
        )
        .filter(Q(adapter=version) | Q(peft_adapter=version))
        .order_by("pk")
    ]
    history = AuditEvent.objects.filter(
        target_type="registry.modelversion", target_id=str(version.pk)
    ).order_by("seq")
    return {
        "version": str(version),
        "id": version.pk,
        "repo": version.repo.name,
        "sha256": version.artifact_id,
        "file_name": version.file_name,
        "format": version.format,
        "licence": version.repo.licence,
        "state": version.state,
        "state_reason": version.state_reason,
        "state_changed_at": _ts(version.state_changed_at),
        "source": {"kind": version.source_kind, **version.source},
        "created_at": _ts(version.created_at),
        "provenance": ancestors,
        "produced_by_finetunes": produced_by,
        "history": [
            {
                "seq": e.seq,
                "at": _ts(e.created_at),
                "actor": e.actor_label,
                "action": e.action,
                "outcome": e.outcome,
                "details": e.details,
                "hash": e.hash,
            }
            for e in history
        ],
        "deployments": [
            {
                "name": d.name,
                "state": d.state,
                "as": "adapter" if d.adapter_id == version.pk else "model",
            }
            for d in deployments.order_by("name")
        ],
        "usage": {
            "requests": usage.count(),
            "prompt_tokens": usage.aggregate(n=Sum("prompt_tokens"))["n"] or 0,
            "completion_tokens": usage.aggregate(n=Sum("completion_tokens"))["n"] or 0,
            "per_deployment": _usage_totals(usage, "deployment_name"),
        },
    }


# Signed renderings ------------------------------------------------------------------


def _manifest(kind: str, fmt: str, *, generated_by: str, event_seq: int, sha: str) -> dict:
    return {
        "aibox_audit_export": REPORT_VERSION,
        "kind": kind,
        "format": fmt,
        "generated_at": format_timestamp(datetime.now().astimezone()),
        "generated_by": generated_by,
        "export_event_seq": event_seq,
        "content_sha256": sha,
        "public_key_sha256": signing.public_key().fingerprint,
    }


def signed_json(kind: str, document: dict[str, Any], *, generated_by: str, event_seq: int) -> bytes:
    # Round-trip once so the signed form is exactly what a reader will parse.
    document = json.loads(canonical_json(document))
    sha = hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()
    manifest = _manifest(kind, "json", generated_by=generated_by, event_seq=event_seq, sha=sha)
    signed = {
        "document": document,
        JSON_MANIFEST_KEY: manifest,
        "signature": signing.sign(manifest_bytes(manifest)),
    }
    return (json.dumps(signed, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _section(title: str, items: list[dict], keys: list[str]) -> tuple:
    """A PDF table: its title, its columns, and a row of cells per item."""
    return title, keys, [[_cell(item.get(k)) for k in keys] for item in items]


USAGE_KEYS = ["requests", "errors", "prompt_tokens", "completion_tokens"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return canonical_json(value)
    return str(value)


def signed_pdf(kind: str, document: dict[str, Any], *, generated_by: str, event_seq: int) -> bytes:
    from apps.audit import pdf  # here, so reportlab loads only when a PDF is made

    out = io.BytesIO()
    if kind == "compliance-report":
        period = document["period"]
        event_keys = ["at", "actor", "action", "target", "details"]
        pdf.document_pdf(
            out,
            title="Compliance report",
            summary=[
                ("Period", f"{period['start']} to {period['end']}"),
                ("Generated by", generated_by),
                ("Audit events in period", document["audit_log"]["events_in_period"]),
                ("Log head at period end", f"#{document['audit_log']['head_seq_at_end']}"),
                ("Signing key (sha256)", signing.public_key().fingerprint),
            ],
            sections=[
                _section("User and role changes", document["user_changes"], event_keys),
                _section("API keys created and revoked", document["api_keys"], event_keys),
                _section(
                    "Models, licences and approval state",
                    document["models"],
                    ["version", "licence", "state", "state_reason", "source"],
                ),
                _section("Approvals and deprecations", document["approvals"], event_keys),
                _section(
                    "Datasets with personal-data findings",
                    document["datasets_with_personal_data"],
                    ["version", "licence", "rows", "rows_with_personal_data", "state"],
                ),
                _section(
                    "Fine-tunes",
                    document["finetunes"],
                    ["name", "base_model", "dataset", "state", "created_at"],
                ),
                _section(
                    "Deployments", document["deployments"], ["name", "model", "adapter", "state"]
                ),
                _section("Deployment changes", document["deployment_changes"], event_keys),
                _section(
                    "Inference usage per API key",
                    document["usage_per_key"],
                    ["api_key_prefix", *USAGE_KEYS],
                ),
                _section(
                    "Inference usage per deployment",
                    document["usage_per_deployment"],
                    ["deployment_name", *USAGE_KEYS],
                ),
                _section("Licence overrides", document["licence_overrides"], event_keys),
            ],
        )
    else:
        usage = document["usage"]
        pdf.document_pdf(
            out,
            title=f"Model dossier: {document['version']}",
            summary=[
                ("sha256", document["sha256"]),
                ("File", f"{document['file_name']} ({document['format']})"),
                ("Licence", document["licence"]),
                ("State", f"{document['state']} {document['state_reason']}".strip()),
                ("Source", canonical_json(document["source"])),
                ("Requests served", usage["requests"]),
                ("Generated by", generated_by),
                ("Signing key (sha256)", signing.public_key().fingerprint),
            ],
            sections=[
                _section(
                    "Provenance (parents, recursively)",
                    document["provenance"],
                    ["depth", "version", "licence", "state", "source", "sha256"],
                ),
                _section(
                    "Produced by fine-tunes",
                    document["produced_by_finetunes"],
                    ["name", "base_model", "dataset", "state"],
                ),
                _section(
                    "History (audit events, approvals included)",
                    document["history"],
                    ["seq", "at", "actor", "action", "details"],
                ),
                _section("Deployments", document["deployments"], ["name", "state", "as"]),
                _section(
                    "Usage per deployment",
                    usage["per_deployment"],
                    ["deployment_name", *USAGE_KEYS],
                ),
            ],
        )
    content = out.getvalue()
    sha = hashlib.sha256(content).hexdigest()
    manifest = _manifest(kind, "pdf", generated_by=generated_by, event_seq=event_seq, sha=sha)
    return content + trailer_line("pdf", manifest, signing.sign(manifest_bytes(manifest)))
