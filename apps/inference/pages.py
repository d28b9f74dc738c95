"""The usage pages: a signed-in user's own inference requests (everyone's for admins and
compliance officers), with a chart per day, the latest failures, a keyset-paged table and
a CSV export of the same filtered view."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import date
from typing import Any

from django import forms
from django.core.validators import MaxValueValidator, MinValueValidator
from django.http import HttpRequest, HttpResponse, QueryDict, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from aibox.redis_clients import sync_client
from apps.accounts.access import login_required
from apps.accounts.models import ApiKey, User
from apps.audit.exports import streamed_download
from apps.audit.signed import csv_escape
from apps.deployments.selectors import deployment_list
from apps.inference.limits import limits_of_keys
from apps.inference.models import UsageRecord
from apps.inference.selectors import (
    USAGE_COLUMNS,
    UsageFilters,
    usage_can_view_all,
    usage_cursor_parse,
    usage_list,
    usage_overview,
    usage_recent,
    usage_records,
)

PAGE_SIZE = 50
CSV_CHUNK_ROWS = 1000
# A period's arithmetic (a day after ``until``, a year before it) must stay within the
# dates Python can hold.
DAY_BOUNDS = [MinValueValidator(date(1970, 1, 1)), MaxValueValidator(date(9999, 12, 1))]


class UsageFilterForm(forms.Form):
    key = forms.CharField(
        required=False, max_length=32, label="API key", help_text="Its prefix, as listed"
    )
    user = forms.CharField(required=False, max_length=150, help_text="A username")
    deployment = forms.CharField(required=False, max_length=100)
    since = forms.DateField(
        required=False,
        label="From (UTC)",
        widget=forms.DateInput(attrs={"type": "date"}),
        validators=DAY_BOUNDS,
    )
    until = forms.DateField(
        required=False,
        label="Until (UTC)",
        widget=forms.DateInput(attrs={"type": "date"}),
        validators=DAY_BOUNDS,
    )

    def __init__(self, *args: Any, can_view_all: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not can_view_all:
            # Only their own requests: no one else to choose. A name given in the URL
            # still filters (and so matches nothing but themselves), as the API does.
            self.fields["user"].widget = forms.HiddenInput()
        self.cursor: str | None = None

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            raise forms.ValidationError("'From' must not be after 'Until'.")
        # The page's cursor travels beside the filters but is not one of the form's
        # fields, so changing a filter always starts again from the newest request.
        before = (self.data.get("before") or "").strip()
        if before:
            try:
                usage_cursor_parse(before)
            except ValueError:
                raise forms.ValidationError(
                    "That page link is not valid: start again from the newest requests."
                ) from None
            self.cursor = before
        return data

    def filters(self) -> UsageFilters:
        data = self.cleaned_data
        return UsageFilters(
            key=data.get("key", "").strip(),
            user=data.get("user", "").strip(),
            deployment=data.get("deployment", "").strip(),
            since=data.get("since"),
            until=data.get("until"),
        )


def filter_form(params: QueryDict, *, user: User) -> tuple[UsageFilterForm, UsageFilters | None]:
    """The filter form and its filters; ``None`` when the input is not valid."""
    form = UsageFilterForm(params or None, can_view_all=usage_can_view_all(user=user))
    if not form.is_bound:
        return form, UsageFilters()
    if not form.is_valid():
        return form, None
    return form, form.filters()


def form_problems(form: forms.Form) -> str:
    return "; ".join(
        f"{name}: {' '.join(errors)}" if name != "__all__" else " ".join(errors)
        for name, errors in form.errors.items()
    )


@login_required
def usage(request: HttpRequest) -> HttpResponse:
    """The page; the filters' fragment for htmx, or only the table for its next page."""
    form, filters = filter_form(request.GET, user=request.user)
    query = request.GET.copy()
    query.pop("before", None)
    context: dict[str, Any] = {
        "form": form,
        "valid": filters is not None,
        "query": query,
        "can_view_all": usage_can_view_all(user=request.user),
    }
    if filters is not None:
        context["page"] = usage_records(
            user=request.user, filters=filters, cursor=form.cursor, limit=PAGE_SIZE
        )
        if request.htmx and request.htmx.target == "usage-table":
            return render(request, "inference/_usage_table.html", context)
        context["overview"] = usage_overview(user=request.user, filters=filters)
        context["key_limits"] = limits_of_keys(
            redis=sync_client(), keys=limited_keys(user=request.user, key_prefix=filters.key)
        )
    template = "inference/_usage_results.html" if request.htmx else "inference/usage.html"
    return render(request, template, context)


@login_required
def deployment_usage(request: HttpRequest, name: str) -> HttpResponse:
    """A deployment's latest requests: the table its page loads (htmx), or a page of its
    own. The inference app sits above the deployments app, so the table is served here."""
    deployment = get_object_or_404(deployment_list(user=request.user), name=name)
    context = {"deployment": deployment, "usage": usage_recent(deployment=deployment)}
    template = (
        "inference/_deployment_usage.html" if request.htmx else "inference/deployment_usage.html"
    )
    return render(request, template, context)


def limited_keys(*, user: User, key_prefix: str = "") -> list[ApiKey]:
    """The keys whose limits a usage view shows: the caller's own usable keys, or, for
    those who see everyone's usage, the key they filtered by."""
    keys = ApiKey.objects.usable().select_related("user").order_by("-created_at")
    if key_prefix and usage_can_view_all(user=user):
        return list(keys.filter(prefix=key_prefix))
    keys = keys.filter(user=user)
    return list(keys.filter(prefix=key_prefix) if key_prefix else keys)


@login_required
def usage_export(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    """The filtered records as CSV, newest first, streamed from a server-side cursor."""
    form, filters = filter_form(request.GET, user=request.user)
    if filters is None:
        return HttpResponse(
            f"Invalid filter: {form_problems(form)}",
            status=400,
            content_type="text/plain; charset=utf-8",
        )
    records = usage_list(user=request.user, filters=filters)
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    return streamed_download(
        request,
        usage_csv(records.iterator(chunk_size=CSV_CHUNK_ROWS)),
        content_type="text/csv; charset=utf-8",
        filename=f"aibox-usage-{stamp}.csv",
    )


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    # Usernames, names and error messages are text others chose: a spreadsheet must not
    # run one as a formula.
    return csv_escape(value) if isinstance(value, str) else value


def usage_csv(records: Iterable[UsageRecord]) -> Iterator[bytes]:
    """USAGE_COLUMNS as a header, then a row per record, in chunks of CSV_CHUNK_ROWS."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(USAGE_COLUMNS)
    for n, record in enumerate(records, start=1):
        writer.writerow(
            [
                str(record.request_id),
                record.created_at.isoformat(),
                *(_cell(getattr(record, column)) for column in USAGE_COLUMNS[2:]),
            ]
        )
        if n % CSV_CHUNK_ROWS == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode("utf-8")
