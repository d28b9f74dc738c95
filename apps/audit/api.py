from __future__ import annotations

from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination

from apps.accounts.models import Scope
from apps.accounts.permissions import role_and_scope
from apps.audit.models import AuditEvent
from apps.audit.selectors import AUDIT_READER_ROLES, AuditFilters, audit_event_list


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = [
            "seq",
            "created_at",
            "actor_label",
            "action",
            "target_type",
            "target_id",
            "target_label",
            "outcome",
            "source_ip",
            "user_agent",
            "details",
            "prev_hash",
            "hash",
        ]


class AuditCursorPagination(CursorPagination):
    ordering = ("-seq",)
    page_size = 50


class AuditEventListView(ListAPIView):
    """Audit events, newest first, cursor-paginated; filters as query parameters."""

    permission_classes = [role_and_scope(*AUDIT_READER_ROLES, scopes=(Scope.AUDIT_READ,))]
    serializer_class = AuditEventSerializer
    pagination_class = AuditCursorPagination

    def get_queryset(self):
        params = self.request.query_params
        filters = AuditFilters(
            action=params.get("action", ""),
            actor=params.get("actor", ""),
            target=params.get("target", ""),
            outcome=params.get("outcome", ""),
            text=params.get("text", ""),
        )
        return audit_event_list(filters=filters)
