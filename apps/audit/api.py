from __future__ import annotations

from django.core.exceptions import ValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination

from apps.accounts.models import Scope
from apps.accounts.permissions import role_and_scope
from apps.audit.chain import HASHED_FIELDS, format_timestamp
from apps.audit.models import AuditEvent, Outcome
from apps.audit.selectors import AUDIT_READER_ROLES, audit_event_list


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
        from apps.audit.views import filter_form

        form, filters = filter_form(self.request.query_params)
        if filters is None:
            raise ValidationError(form.errors)
        return audit_event_list(filters=filters)
