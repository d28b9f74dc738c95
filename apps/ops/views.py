from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpResponse
from prometheus_client.exposition import choose_encoder
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from apps.accounts.models import Role, Scope
from apps.accounts.permissions import role_and_scope
from apps.audit.middleware import client_ip
from apps.ops.metrics import REGISTRY


def _from_allowed_network(request: Request) -> bool:
    ip = client_ip(request._request)
    if ip is None:
        return False
    address = ipaddress.ip_address(ip)
    return any(address in network for network in settings.METRICS_ALLOWED_NETWORKS)


_admin_with_metrics_scope = role_and_scope(Role.ADMIN, scopes=(Scope.METRICS,))


class MetricsAccess(BasePermission):
    """A scraper on a network in AIBOX_METRICS_ALLOWED_NETWORKS needs no key; anyone
    else is an admin: an API key with the ``metrics`` (or ``admin``) scope, or a session."""

    message = "Only admins may read metrics (an API key needs the metrics scope)."

    def has_permission(self, request: Request, view) -> bool:
        if _from_allowed_network(request):
            return True
        check = _admin_with_metrics_scope()
        allowed = check.has_permission(request, view)
        if not allowed and request.user is not None:
            self.message = check.message
        return allowed


class MetricsView(APIView):
    """GET /metrics: Prometheus text exposition of deployments, workers and usage.

    An admin's API key with the ``metrics`` scope (or ``admin``), an admin's session, or
    a scraper on an allowed network.
    """

    permission_classes = [MetricsAccess]

    def get(self, request: Request) -> HttpResponse:
        # Prometheus says in Accept which formats it reads (text, OpenMetrics).
        encoder, content_type = choose_encoder(request.META.get("HTTP_ACCEPT", ""))
        return HttpResponse(encoder(REGISTRY), content_type=content_type)
