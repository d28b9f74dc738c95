from __future__ import annotations

from datetime import UTC, datetime

from django import forms
from django.core.exceptions import ObjectDoesNotExist
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import role_required
from apps.audit import exports, signing
from apps.audit.links import target_links
from apps.audit.models import Outcome
from apps.audit.selectors import AUDIT_READER_ROLES, AuditFilters, audit_event_list
from apps.audit.services import (
    audit_dossier_generate,
    audit_export_begin,
    audit_report_generate,
)

PAGE_SIZE = 50


class AuditFilterForm(forms.Form):
    since = forms.DateTimeField(
        required=False,
        label="From (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )
    until = forms.DateTimeField(
        required=False,
        label="Until (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )
    actor = forms.CharField(required=False, max_length=200, help_text="A username")
    action = forms.CharField(
        required=False, max_length=100, help_text="Prefix, e.g. 'user.' or 'apikey.create'"
    )
    target_type = forms.CharField(
        required=False, max_length=100, help_text="e.g. registry.modelversion"
    )
    target_id = forms.CharField(required=False, max_length=100, label="Target id")
    target = forms.CharField(required=False, max_length=300, help_text="Id or part of its name")
    outcome = forms.ChoiceField(required=False, choices=[("", "Any"), *Outcome.choices])
    text = forms.CharField(required=False, max_length=200, label="Details contain")
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)

    def clean_since(self) -> datetime | None:
        return _in_utc(self.cleaned_data["since"])

    def clean_until(self) -> datetime | None:
        return _in_utc(self.cleaned_data["until"])

    def clean(self):
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            raise forms.ValidationError("'From' must be before 'Until'.")
        return data

    def filters(self) -> AuditFilters:
        data = self.cleaned_data
        since: datetime | None = data.get("since")
        until: datetime | None = data.get("until")
        return AuditFilters(
            action=data.get("action", "").strip(),
            actor=data.get("actor", "").strip(),
            target_type=data.get("target_type", "").strip(),
            target_id=data.get("target_id", "").strip(),
            target=data.get("target", "").strip(),
            outcome=data.get("outcome", ""),
            text=data.get("text", "").strip(),
            since=since,
            until=until,
        )


def _in_utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC: PostgreSQL refuses a UTC offset over 15:59, which Python allows."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # a UTC time before year 1 or after 9999
        raise forms.ValidationError("Enter a time between the years 1 and 9999.") from exc


def filter_form(params) -> tuple[AuditFilterForm, AuditFilters | None]:
    """The filter form and its filters; ``None`` when the input is not valid."""
    form = AuditFilterForm(params or None)
    if not form.is_bound:
        return form, AuditFilters()
    if not form.is_valid():
        return form, None
    return form, form.filters()


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
    template = "audit/_event_table.html" if request.htmx else "audit/event_list.html"
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
    plan = audit_export_begin(actor=request.user, filters=filters, fmt=fmt)
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


class ReportForm(forms.Form):
    start = forms.DateTimeField(
        label="From (UTC)", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    end = forms.DateTimeField(
        label="Until (UTC)", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )

    def clean(self):
        data = super().clean()
        if data.get("start") and data.get("end") and data["start"] >= data["end"]:
            raise forms.ValidationError("'From' must be before 'Until'.")
        return data


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
    return render(request, "audit/report.html", {"form": form}, status=status)


@role_required(*AUDIT_READER_ROLES)
@require_http_methods(["GET", "POST"])
def model_dossier(request: HttpRequest, pk: int) -> HttpResponse:
    from apps.audit.reports import model_dossier as build
    from apps.registry.selectors import model_version_get

    try:
        version = model_version_get(user=request.user, pk=pk)
    except ObjectDoesNotExist as exc:
        raise Http404("No such model version.") from exc
    if request.method == "POST":
        fmt = request.POST.get("format", "")
        if fmt not in ("pdf", "json"):
            return HttpResponse("Unknown dossier format; use pdf or json.", status=400)
        data = audit_dossier_generate(actor=request.user, version=version, fmt=fmt)
        name = f"aibox-dossier-{version.repo.name}-v{version.number}"
        return _download(data, fmt=fmt, name=name)
    return render(
        request, "audit/dossier.html", {"version": version, "dossier": build(version=version)}
    )
