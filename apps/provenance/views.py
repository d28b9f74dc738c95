from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import login_required, role_required
from apps.audit import exports, signing
from apps.audit.selectors import audit_event_list
from apps.provenance.bom import bom_file_name
from apps.provenance.forms import ReportForm, filter_form
from apps.provenance.lineage import lineage_layout, version_lineage
from apps.provenance.links import target_links
from apps.provenance.reports import model_dossier as build_dossier
from apps.provenance.selectors import AUDIT_READER_ROLES
from apps.provenance.services import (
    audit_dossier_generate,
    audit_export_start,
    audit_report_generate,
    model_version_bom,
)
from apps.registry.licences import version_licence
from apps.registry.models import ModelVersion
from apps.registry.selectors import model_version_get

PAGE_SIZE = 50


def version_or_404(request: HttpRequest, pk: int) -> ModelVersion:
    """The model version ``pk`` if the caller may see it (a page's or an API call's)."""
    try:
        return model_version_get(user=request.user, pk=pk)
    except ModelVersion.DoesNotExist as exc:
        raise Http404("No such model version.") from exc


# The audit log ---------------------------------------------------------------------


@role_required(*AUDIT_READER_ROLES)
def audit_list(request: HttpRequest) -> HttpResponse:
    form, filters = filter_form(request.GET)
    events: list = []
    next_before = None
    if filters is not None:
        before = form.cleaned_data.get("before") if form.is_bound else None
        events = list(audit_event_list(filters=filters, before_seq=before)[: PAGE_SIZE + 1])
        if len(events) > PAGE_SIZE:
            events = events[:PAGE_SIZE]
            next_before = events[-1].seq
        links = target_links(events, viewer=request.user)
        for event in events:
            event.link = links.get(event.seq)
    query = request.GET.copy()
    query.pop("before", None)
    context = {
        "form": form,
        "events": events,
        "next_before": next_before,
        "query": query,
        "valid": filters is not None,
        "public_key": signing.public_key(),
    }
    template = "provenance/_event_table.html" if request.htmx else "provenance/event_list.html"
    return render(request, template, context)


# Downloads that write an audit event answer POST only (with Django's CSRF check), so no
# other site can make a signed-in browser produce one with a link.


@role_required(*AUDIT_READER_ROLES)
@require_POST
def audit_export(request: HttpRequest, fmt: str) -> HttpResponse:
    if fmt not in exports.FORMATS:
        raise Http404("No such export format.")
    form, filters = filter_form(request.POST.copy())
    if filters is None:
        problems = "; ".join(f"{name}: {' '.join(errors)}" for name, errors in form.errors.items())
        return HttpResponse(
            f"Invalid filter: {problems}", status=400, content_type="text/plain; charset=utf-8"
        )
    plan = audit_export_start(actor=request.user, filters=filters, fmt=fmt)
    return exports.streamed_download(
        request,
        exports.stream_export(plan),
        content_type=exports.FORMATS[fmt],
        filename=plan.filename,
    )


@role_required(*AUDIT_READER_ROLES)
def public_key_pem(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(signing.public_key().pem, content_type="application/x-pem-file")
    response["Content-Disposition"] = 'attachment; filename="aibox-audit-public-key.pem"'
    return response


# Reports and dossiers --------------------------------------------------------------


def _download(data: bytes, *, fmt: str, name: str) -> HttpResponse:
    content_type = "application/pdf" if fmt == "pdf" else "application/json"
    response = HttpResponse(data, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
    response["Cache-Control"] = "no-store"
    return response


@role_required(*AUDIT_READER_ROLES)
@require_http_methods(["GET", "POST"])
def audit_report(request: HttpRequest) -> HttpResponse:
    """The period report form (GET); POSTed with a period and a format, the signed report."""
    fmt = request.POST.get("format", "")
    form = ReportForm(request.POST or None)
    if fmt and fmt not in ("pdf", "json"):
        return HttpResponse("Unknown report format; use pdf or json.", status=400)
    if fmt and form.is_valid():
        start, end = form.cleaned_data["start"], form.cleaned_data["end"]
        data = audit_report_generate(actor=request.user, start=start, end=end, fmt=fmt)
        name = f"aibox-compliance-report-{start:%Y%m%d}-{end:%Y%m%d}"
        return _download(data, fmt=fmt, name=name)
    status = 400 if fmt else 200
    return render(request, "provenance/report.html", {"form": form}, status=status)


@role_required(*AUDIT_READER_ROLES)
@require_http_methods(["GET", "POST"])
def model_dossier(request: HttpRequest, pk: int) -> HttpResponse:
    version = version_or_404(request, pk)
    if request.method == "POST":
        fmt = request.POST.get("format", "")
        if fmt not in ("pdf", "json"):
            return HttpResponse("Unknown dossier format; use pdf or json.", status=400)
        data = audit_dossier_generate(actor=request.user, version=version, fmt=fmt)
        name = f"aibox-dossier-{version.repo.name}-v{version.number}"
        return _download(data, fmt=fmt, name=name)
    context = {"version": version, "dossier": build_dossier(version=version)}
    return render(request, "provenance/dossier.html", context)


# Lineage and the ML-BOM ------------------------------------------------------------


@login_required
def version_lineage_page(request: HttpRequest, pk: int) -> HttpResponse:
    """Ancestors and descendants of a version as a graph (inline SVG) and as lists."""
    version = version_or_404(request, pk)
    lineage = version_lineage(user=request.user, version=version)
    context = {
        "version": version,
        "lineage": lineage,
        "layout": lineage_layout(lineage),
        "ancestors": lineage.of_relation("ancestor"),
        "descendants": lineage.of_relation("descendant"),
        "licence": version_licence(version),
    }
    return render(request, "provenance/lineage.html", context)


@login_required
@require_POST
def version_bom(request: HttpRequest, pk: int) -> HttpResponse:
    """Download the CycloneDX ML-BOM (the same document as the API's). A POST with a CSRF
    token: each download is an audit event, which no other site may start."""
    version = version_or_404(request, pk)
    bom = model_version_bom(
        actor=request.user, version=version, absolute=request.build_absolute_uri
    )
    response = JsonResponse(bom, json_dumps_params={"indent": 2})
    response["Content-Type"] = "application/vnd.cyclonedx+json; version=1.6"
    response["Content-Disposition"] = f'attachment; filename="{bom_file_name(version)}"'
    return response
