from __future__ import annotations

from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination

from apps.accounts.models import Scope
from apps.accounts.permissions import role_and_scope
from apps.audit.chain import HASHED_FIELDS, format_timestamp
from apps.audit.models import AuditEvent
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


class AuditEventListView(ListAPIView):
    """Audit events, newest first, cursor-paginated; the audit page's filters as query
    parameters (since, until, actor, action, target_type, target_id, target, outcome,
    text); an invalid one answers 400."""

    permission_classes = [role_and_scope(*AUDIT_READER_ROLES, scopes=(Scope.AUDIT_READ,))]
    serializer_class = AuditEventSerializer
    pagination_class = AuditCursorPagination

    def get_queryset(self):
        from apps.audit.views import filter_form

        form, filters = filter_form(self.request.query_params)
        if filters is None:
            raise ValidationError(form.errors.get_json_data())
        return audit_event_list(filters=filters)
