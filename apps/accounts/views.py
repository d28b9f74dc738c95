from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout, update_session_auth_hash
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm, PasswordChangeForm
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts import selectors, services
from apps.accounts.access import login_required, role_required
from apps.accounts.forms import ApiKeyCreateForm, LimitForm, UserCreateForm, UserEditForm
from apps.accounts.models import ApiKey, Role, User


class LoginView(auth_views.LoginView):
    template_name = "accounts/login.html"
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            sso_enabled=bool(settings.OIDC_ISSUER),
            break_glass_only=settings.LOCAL_LOGIN == "break-glass",
            sso_refused=self.request.GET.get("sso") == "refused",
            **kwargs,
        )

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        response = super().form_valid(form)
        services.auth_login_succeeded(user=form.get_user())
        return response

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        services.auth_login_failed(
            username=self.request.POST.get("username", "")[:150],
            locked_out=getattr(self.request, "axes_locked_out", False),
        )
        return super().form_invalid(form)


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        services.auth_logout(user=request.user)
    logout(request)
    messages.info(request, "You are logged out.")
    return redirect("accounts:login")


@login_required
@require_http_methods(["GET", "POST"])
def password_change(request: HttpRequest) -> HttpResponse:
    form = PasswordChangeForm(request.user, request.POST or None)
    if request.method == "POST" and form.is_valid():
        services.user_set_password(
            actor=request.user, user=request.user, password=form.cleaned_data["new_password1"]
        )
        update_session_auth_hash(request, request.user)
        messages.success(request, "Your password has been changed.")
        return redirect("core:home")
    return render(request, "accounts/password_change.html", {"form": form})


# --- user administration (admins) -------------------------------------------


@role_required(Role.ADMIN)
def user_list(request: HttpRequest) -> HttpResponse:
    return render(request, "accounts/user_list.html", {"users": selectors.user_list()})


@role_required(Role.ADMIN)
@require_http_methods(["GET", "POST"])
def user_create(request: HttpRequest) -> HttpResponse:
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        user = services.user_create(
            actor=request.user,
            username=data["username"],
            role=Role(data["role"]),
            password=data["password"],
            email=data["email"],
            first_name=data["first_name"],
            last_name=data["last_name"],
        )
        messages.success(request, f"User {user.username} created as {user.get_role_display()}.")
        return redirect("accounts:user_list")
    return render(request, "accounts/user_form.html", {"form": form, "creating": True})


@role_required(Role.ADMIN)
@require_http_methods(["GET", "POST"])
def user_edit(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        user = selectors.user_get(pk=pk)
    except User.DoesNotExist as exc:
        raise Http404("No such user.") from exc
    initial = {
        "first_name": user.first_name,
        "last_name": user.last_name,
        "email": user.email,
        "role": user.role,
        "is_active": user.is_active,
    }
    form = UserEditForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            services.user_update(
                actor=request.user,
                user=user,
                role=Role(data["role"]),
                is_active=data["is_active"],
                email=data["email"],
                first_name=data["first_name"],
                last_name=data["last_name"],
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"User {user.username} saved.")
            return redirect("accounts:user_list")
    return render(
        request, "accounts/user_form.html", {"form": form, "creating": False, "subject": user}
    )


# --- API keys ----------------------------------------------------------------


def _key_list_context(request: HttpRequest, form: ApiKeyCreateForm) -> dict:
    show_all = request.user.role == Role.ADMIN and request.GET.get("all") == "1"
    return {
        "form": form,
        "keys": selectors.api_key_list(user=request.user, include_all=show_all),
        "show_all": show_all,
    }


@login_required
@require_http_methods(["GET", "POST"])
def api_key_list(request: HttpRequest) -> HttpResponse:
    allowed = services.ROLE_SCOPES[request.user.role]
    form = ApiKeyCreateForm(request.POST or None, allowed_scopes=allowed)
    issued = None
    if request.method == "POST" and form.is_valid():
        try:
            issued = services.api_key_create(
                actor=request.user,
                owner=request.user,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                deployments=form.deployment_names(),
                expires_at=form.cleaned_data["expires_at"],
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            form = ApiKeyCreateForm(allowed_scopes=allowed)
    context = _key_list_context(request, form) | {"issued": issued}
    template = "accounts/_api_keys.html" if request.htmx else "accounts/api_keys.html"
    # The one response that carries a secret must never be cached anywhere.
    response = render(request, template, context)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def api_key_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        api_key = selectors.api_key_get(user=request.user, pk=pk)
    except ApiKey.DoesNotExist as exc:
        raise Http404("No such API key.") from exc
    services.api_key_revoke(actor=request.user, api_key=api_key)
    messages.success(request, f"API key {api_key.name} revoked.")
    if request.htmx:
        form = ApiKeyCreateForm(allowed_scopes=services.ROLE_SCOPES[request.user.role])
        return render(request, "accounts/_api_keys.html", _key_list_context(request, form))
    return redirect("accounts:api_keys")


# --- usage limits on the inference API (admins) ------------------------------


@role_required(Role.ADMIN)
def limit_list(request: HttpRequest) -> HttpResponse:
    return render(
        request, "accounts/limit_list.html", {"overview": selectors.usage_limit_overview()}
    )


def _limit_edit(request: HttpRequest, subject: dict[str, Any]) -> HttpResponse:
    """The limits page of one subject: the form, and what applies to it in effect."""
    limits = selectors.usage_limit_subject(**subject)
    form = LimitForm(request.POST or None, initial=limits.values)
    clearing = "clear" in request.POST
    if request.method == "POST" and (clearing or form.is_valid()):
        try:
            if clearing:
                services.limit_clear(actor=request.user, **subject)
            else:
                services.limit_set(actor=request.user, **subject, **form.cleaned_data)
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            done = "removed" if clearing else "saved"
            messages.success(request, f"Limits of {limits.label} {done}.")
            # Back to the page (htmx follows it and asks for the fragment) with the new
            # values and what they now mean in effect.
            return redirect(request.path)
    template = "accounts/_limit_form.html" if request.htmx else "accounts/limit_edit.html"
    return render(request, template, {"form": form, "limits": limits})


@role_required(Role.ADMIN)
@require_http_methods(["GET", "POST"])
def limit_api_key(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        api_key = selectors.api_key_get(user=request.user, pk=pk)
    except ApiKey.DoesNotExist as exc:
        raise Http404("No such API key.") from exc
    return _limit_edit(request, {"api_key": api_key})


@role_required(Role.ADMIN)
@require_http_methods(["GET", "POST"])
def limit_user(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        user = selectors.user_get(pk=pk)
    except User.DoesNotExist as exc:
        raise Http404("No such user.") from exc
    return _limit_edit(request, {"user": user})


@role_required(Role.ADMIN)
@require_http_methods(["GET", "POST"])
def limit_role(request: HttpRequest, role: str) -> HttpResponse:
    if role not in Role.values:
        raise Http404("No such role.")
    return _limit_edit(request, {"role": role})
