from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from apps.accounts.access import login_required, role_required
from apps.accounts.models import ApiKey, Role
from apps.audit.models import AuditEvent
from apps.core.selectors import readiness
from apps.ops import selectors as ops_selectors
from apps.provenance.selectors import audit_can_view


@login_required
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    if user.has_role(Role.ADMIN):
        return dashboard(request)
    context: dict = {
        "my_active_keys": ApiKey.objects.filter(user=user).usable().count(),
        "show_audit": audit_can_view(user=user),
    }
    if context["show_audit"]:
        context["recent_events"] = AuditEvent.objects.order_by("-seq")[:8]
    return render(request, "core/home.html", context)


@role_required(Role.ADMIN)
@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    """The operations dashboard, admins' home page; htmx polls its fragment."""
    context = ops_selectors.dashboard()
    template = "core/_dashboard.html" if request.htmx else "core/dashboard.html"
    return render(request, template, context)


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. Touches nothing else."""
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: database and Redis reachable; reports live Celery workers."""
    state = readiness()
    body = {
        "status": "ready" if state.ready else "not ready",
        "database": state.database,
        "redis": state.redis,
        "workers": len(state.workers),
    }
    return JsonResponse(body, status=200 if state.ready else 503)
