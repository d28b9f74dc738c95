from __future__ import annotations

from django import forms
from django.contrib.auth.password_validation import validate_password

from apps.accounts.models import (
    LIMIT_MAX_BUDGET,
    LIMIT_MAX_INT,
    SYSTEM_USERNAME,
    LimitPeriod,
    Role,
    Scope,
    User,
)


class UserCreateForm(forms.Form):
    username = forms.RegexField(
        regex=r"^[\w.@+-]+\Z",
        max_length=150,
        error_messages={"invalid": "Use letters, digits and @ . + - _ only."},
    )
    first_name = forms.CharField(max_length=150, required=False)
    last_name = forms.CharField(max_length=150, required=False)
    email = forms.EmailField(required=False)
    role = forms.ChoiceField(choices=Role.choices)
    password = forms.CharField(
        widget=forms.PasswordInput, help_text="At least 10 characters; the user can change it."
    )

    def clean_username(self) -> str:
        username = self.cleaned_data["username"]
        if username.lower() == SYSTEM_USERNAME:
            raise forms.ValidationError(f"The username {SYSTEM_USERNAME!r} is reserved.")
        if User.objects.filter(username__iexact=username).exists():
            raise forms.ValidationError("A user with that username already exists.")
        return username

    def clean(self) -> dict:
        cleaned = super().clean()
        password = cleaned.get("password")
        if password:
            probe = User(username=cleaned.get("username", ""), email=cleaned.get("email", ""))
            try:
                validate_password(password, probe)
            except forms.ValidationError as exc:
                self.add_error("password", exc)
        return cleaned


class UserEditForm(forms.Form):
    first_name = forms.CharField(max_length=150, required=False)
    last_name = forms.CharField(max_length=150, required=False)
    email = forms.EmailField(required=False)
    role = forms.ChoiceField(choices=Role.choices)
    is_active = forms.BooleanField(
        required=False, label="Active", help_text="Inactive users cannot log in or use API keys."
    )


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What uses this key, e.g. 'helpdesk bot'.")
    scopes = forms.MultipleChoiceField(choices=Scope.choices, widget=forms.CheckboxSelectMultiple)
    deployments = forms.CharField(
        required=False,
        help_text="Inference only: comma-separated deployment names. Empty means all.",
    )
    expires_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Optional. The key stops working at this time (UTC).",
    )

    def __init__(self, *args, allowed_scopes: frozenset[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["scopes"].choices = [c for c in Scope.choices if c[0] in allowed_scopes]

    def deployment_names(self) -> list[str]:
        raw = self.cleaned_data.get("deployments") or ""
        return [name.strip() for name in raw.split(",") if name.strip()]


class LimitForm(forms.Form):
    """Limits on one subject; an empty box sets no limit at this level."""

    requests_per_minute = forms.IntegerField(
        required=False, min_value=1, max_value=LIMIT_MAX_INT, help_text="Requests in any 60 s."
    )
    tokens_per_minute = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=LIMIT_MAX_INT,
        help_text="Prompt and completion tokens in any 60 s; a request is let in while "
        "fewer have been used.",
    )
    max_concurrent = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=LIMIT_MAX_INT,
        label="Concurrent requests",
        help_text="Requests (streamed or not) in flight at once.",
    )
    token_budget = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=LIMIT_MAX_BUDGET,
        help_text="Prompt and completion tokens per period; then calls answer 429 "
        "(insufficient_quota) until the period ends.",
    )
    budget_period = forms.ChoiceField(
        required=False, choices=[("", "—"), *LimitPeriod.choices], label="Budget period"
    )

    def clean_budget_period(self) -> str | None:
        return self.cleaned_data["budget_period"] or None
