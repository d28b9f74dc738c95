from __future__ import annotations

from datetime import datetime

from django import forms
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from apps.accounts.access import role_required
from apps.audit.models import Outcome
from apps.audit.selectors import AUDIT_READER_ROLES, AuditFilters, audit_event_list

PAGE_SIZE = 50


class AuditFilterForm(forms.Form):
    action = forms.CharField(required=False, help_text="Prefix, e.g. 'user.' or 'apikey.create'")
    actor = forms.CharField(required=False)
    target = forms.CharField(required=False)
    outcome = forms.ChoiceField(required=False, choices=[("", "Any")] + Outcome.choices)
    text = forms.CharField(required=False, label="Details contain")
    since = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    until = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)

    def filters(self) -> AuditFilters:
        data = self.cleaned_data
        since: datetime | None = data.get("since")
        until: datetime | None = data.get("until")
        return AuditFilters(
            action=data.get("action", "").strip(),
            actor=data.get("actor", "").strip(),
            target=data.get("target", "").strip(),
            outcome=data.get("outcome", ""),
            text=data.get("text", "").strip(),
            since=since,
            until=until,
        )


@role_required(*AUDIT_READER_ROLES)
def audit_list(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET or None)
    events: list = []
    next_before = None
    if form.is_bound and not form.is_valid():
        pass  # errors render beside the fields; no events for an invalid filter
    else:
        filters = form.filters() if form.is_bound else AuditFilters()
        before = form.cleaned_data.get("before") if form.is_bound else None
        events = list(audit_event_list(filters=filters, before_seq=before)[: PAGE_SIZE + 1])
        if len(events) > PAGE_SIZE:
            events = events[:PAGE_SIZE]
            next_before = events[-1].seq
    query = request.GET.copy()
    query.pop("before", None)
    context = {"form": form, "events": events, "next_before": next_before, "query": query}
    template = "audit/_event_table.html" if request.htmx else "audit/event_list.html"
    return render(request, template, context)
