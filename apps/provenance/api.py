from __future__ import annotations

from django.core.exceptions import ValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import APIException
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Scope
from apps.accounts.permissions import NotFromAnotherSite, role_and_scope
from apps.audit import exports, signing
from apps.audit.chain import HASHED_FIELDS, format_timestamp
from apps.audit.models import AuditEvent, Outcome
from apps.audit.selectors import audit_event_list
from apps.provenance.bom import bom_file_name
from apps.provenance.forms import filter_form
from apps.provenance.lineage import version_lineage
from apps.provenance.selectors import AUDIT_READER_ROLES
from apps.provenance.services import audit_export_start, model_version_bom
from apps.provenance.views import version_or_404
from apps.registry.api import READERS as REGISTRY_READERS


class AuditEventSerializer(serializers.ModelSerializer):
    # The chain's own timestamp form, so a client can recompute each hash as served.
    created_at = serializers.SerializerMethodField()

    class Meta:
        model = AuditEvent
        # Everything the hash covers, plus the links: enough to re-verify offline.
        fields = [*HASHED_FIELDS, "prev_hash", "hash"]

    def get_created_at(self, event: AuditEvent) -> str:
        return format_timestamp(event.created_at)


class AuditCursorPagination(CursorPagination):
    ordering = ("-seq",)
    page_size = 50


def _text(max_length: int) -> dict:
    return {"type": "string", "maxLength": max_length}


class AuditEventListView(ListAPIView):
    """Audit events, newest first, cursor-paginated; the audit page's filters as query
    parameters (since, until, actor, action, target_type, target_id, target, outcome,
    text); an invalid one answers 400."""

    permission_classes = [role_and_scope(*AUDIT_READER_ROLES, scopes=(Scope.AUDIT_READ,))]
    serializer_class = AuditEventSerializer
    pagination_class = AuditCursorPagination

    @extend_schema(
        parameters=[
            OpenApiParameter("since", OpenApiTypes.DATETIME, description="From (UTC)"),
            OpenApiParameter("until", OpenApiTypes.DATETIME, description="Until (UTC)"),
            OpenApiParameter("actor", _text(200), description="A username"),
            OpenApiParameter("action", _text(100), description="An action, or its start"),
            OpenApiParameter("target_type", _text(100), description="e.g. registry.modelversion"),
            OpenApiParameter("target_id", _text(100)),
            OpenApiParameter("target", _text(300), description="Id or part of its name"),
            OpenApiParameter("outcome", str, enum=Outcome.values),
            OpenApiParameter("text", _text(200), description="Text in the details"),
        ]
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        form, filters = filter_form(self.request.query_params)
        if filters is None:
            raise ValidationError(form.errors)
        return audit_event_list(filters=filters)


AUDIT_READERS = role_and_scope(*AUDIT_READER_ROLES, scopes=(Scope.AUDIT_READ,))
NO_SIGNING_KEY = OpenApiResponse(description="The box's audit signing key is missing.")


class SigningKeyUnavailable(APIException):
    status_code = 503
    default_detail = "The box's audit signing key is missing."


def _signing_key_or_503() -> signing.PublicKey:
    try:
        return signing.public_key()
    except signing.SigningKeyMissing as exc:
        raise SigningKeyUnavailable(str(exc)) from exc


class AuditExportFiltersSerializer(serializers.Serializer):
    """The audit page's filters, for the schema (the page's form checks them)."""

    since = serializers.DateTimeField(required=False, help_text="From (UTC)")
    until = serializers.DateTimeField(required=False, help_text="Until (UTC)")
    actor = serializers.CharField(required=False, max_length=200, help_text="A username")
    action = serializers.CharField(required=False, max_length=100, help_text="Or its start")
    target_type = serializers.CharField(required=False, max_length=100)
    target_id = serializers.CharField(required=False, max_length=100)
    target = serializers.CharField(required=False, max_length=300)
    outcome = serializers.ChoiceField(required=False, choices=Outcome.choices)
    text = serializers.CharField(required=False, max_length=200)


class AuditExportView(APIView):
    """POST the audit page's filters (a JSON object; none: the whole log) and get the
    signed export of that view, as the audit page's export buttons give it (CSV, JSON
    Lines or PDF; docs/audit-verification.md). Audited as ``audit.export``."""

    permission_classes = [AUDIT_READERS]
    fmt = ""

    @extend_schema(
        request=AuditExportFiltersSerializer,
        responses={
            # One per route (export.csv, .jsonl, .pdf): the format's own type.
            **{
                (200, media.split(";")[0]): OpenApiTypes.BINARY
                for media in exports.FORMATS.values()
            },
            503: NO_SIGNING_KEY,
        },
    )
    def post(self, request: Request):
        _signing_key_or_503()
        params = {k: v for k, v in request.data.items() if v is not None}
        form, filters = filter_form({k: str(v) for k, v in params.items()})
        if filters is None:
            raise ValidationError(form.errors)
        plan = audit_export_start(actor=request.user, filters=filters, fmt=self.fmt)
        return exports.streamed_download(
            request,
            exports.stream_export(plan),
            content_type=exports.FORMATS[self.fmt],
            filename=plan.filename,
        )


class AuditPublicKeySerializer(serializers.Serializer):
    pem = serializers.CharField(help_text="The Ed25519 public key, PEM (SubjectPublicKeyInfo)")
    fingerprint = serializers.CharField(help_text="sha256 of the 32 raw key bytes, hex")


class AuditPublicKeyView(APIView):
    """GET the public key that signs audit exports, reports and dossiers, and its
    fingerprint: compare the fingerprint with the one the box's operator gives before
    trusting the key (docs/audit-verification.md)."""

    permission_classes = [AUDIT_READERS]

    @extend_schema(responses={200: AuditPublicKeySerializer, 503: NO_SIGNING_KEY})
    def get(self, request: Request) -> Response:
        key = _signing_key_or_503()
        return Response({"pem": key.pem, "fingerprint": key.fingerprint})


class LineageView(APIView):
    """GET the version's ancestors and descendants as typed nodes and edges."""

    permission_classes = [REGISTRY_READERS]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, pk: int) -> Response:
        lineage = version_lineage(user=request.user, version=version_or_404(request, pk))
        return Response(lineage.as_dict())


class BomView(APIView):
    """GET the version and everything it was made from as a CycloneDX 1.6 ML-BOM (JSON)."""

    permission_classes = [REGISTRY_READERS, NotFromAnotherSite]

    @extend_schema(responses={(200, "application/vnd.cyclonedx+json"): OpenApiTypes.OBJECT})
    def get(self, request: Request, pk: int) -> Response:
        version = version_or_404(request, pk)
        bom = model_version_bom(
            actor=request.user, version=version, absolute=request.build_absolute_uri
        )
        return Response(
            bom,
            content_type="application/vnd.cyclonedx+json; version=1.6",
            headers={"Content-Disposition": f'attachment; filename="{bom_file_name(version)}"'},
        )
