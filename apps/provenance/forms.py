"""The audit log's filters (the page, its exports and the API read the same form) and the
period report's form."""

from __future__ import annotations

from datetime import UTC, datetime

from django import forms

from apps.audit.models import Outcome
from apps.audit.selectors import AuditFilters


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
