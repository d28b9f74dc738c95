"""Single sign-on with OpenID Connect (mozilla-django-oidc), and who may still use a password.

The identity provider is named by its issuer URL alone (``AIBOX_OIDC_ISSUER``): its
endpoints and signing keys come from its discovery document, fetched on first use and
checked to name the same issuer. A person signs in at the provider; AIBox matches them
by the provider's stable subject id (never by e-mail, which can be reassigned), takes
their role from a claim (``AIBOX_OIDC_ROLE_CLAIM``, usually ``groups``) through
``AIBOX_OIDC_ROLE_MAP``, and creates or updates their user, audited. Someone whose claim
maps to no role is refused, and so is an AIBox user an admin has deactivated.

With ``AIBOX_LOCAL_LOGIN=break-glass``, passwords work only for the users named in
``AIBOX_BREAK_GLASS_USERS``: everyone else signs in through the provider.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, NoReturn

import jwt
import requests
from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.http import Http404
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.utils import import_from_settings
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCAuthenticationRequestView

from apps.accounts.models import User
from apps.accounts.services import (
    auth_login_failed,
    auth_login_succeeded,
    user_sso_create,
    user_sso_role_set,
)

logger = logging.getLogger(__name__)

# mozilla-django-oidc's setting -> the discovery document's field.
_DISCOVERED = {
    "OIDC_OP_AUTHORIZATION_ENDPOINT": "authorization_endpoint",
    "OIDC_OP_TOKEN_ENDPOINT": "token_endpoint",
    "OIDC_OP_USER_ENDPOINT": "userinfo_endpoint",
    "OIDC_OP_JWKS_ENDPOINT": "jwks_uri",
}


def sso_enabled() -> bool:
    return bool(settings.OIDC_ISSUER)


@lru_cache(maxsize=4)
def _discovery(issuer: str) -> dict[str, Any]:
    url = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    document = response.json()
    if document.get("issuer", "").rstrip("/") != issuer.rstrip("/"):
        raise ImproperlyConfigured(
            f"{url} names the issuer {document.get('issuer')!r}, not AIBOX_OIDC_ISSUER."
        )
    return document


def oidc_setting(attr: str, *default: Any) -> Any:
    """mozilla-django-oidc's settings, with the provider's endpoints from discovery."""
    if attr in _DISCOVERED:
        # Without an issuer the views answer 404 before they would use any of these.
        return _discovery(settings.OIDC_ISSUER)[_DISCOVERED[attr]] if sso_enabled() else None
    return import_from_settings(attr, *default)


def role_from_claims(claims: dict[str, Any]) -> str | None:
    """The role of the first AIBOX_OIDC_ROLE_MAP entry whose group the claim holds."""
    value = claims.get(settings.OIDC_ROLE_CLAIM) or []
    groups = {value} if isinstance(value, str) else {str(v) for v in value}
    return next((role for group, role in settings.OIDC_ROLE_MAP if group in groups), None)


class SsoBackend(OIDCAuthenticationBackend):
    get_settings = staticmethod(oidc_setting)

    def retrieve_matching_jwk(self, token: bytes):
        """The provider's key for this ID token. A JWKS key's ``kid`` is optional (RFC
        7517): with none in the token's header, the one key of its algorithm is used;
        mozilla-django-oidc would fail on a key set without ``kid``s."""
        header = jwt.get_unverified_header(token)
        response = requests.get(self.OIDC_OP_JWKS_ENDPOINT, timeout=10)
        response.raise_for_status()
        keys = [
            key
            for key in response.json().get("keys", [])
            if key.get("alg", header["alg"]) == header["alg"]
            and ("kid" not in header or key.get("kid") == header["kid"])
        ]
        if len(keys) != 1:
            raise SuspiciousOperation("The provider's key set has no single key for the token.")
        return jwt.PyJWK(keys[0])

    def filter_users_by_claims(self, claims: dict[str, Any]):
        return User.objects.filter(oidc_subject=claims.get("sub", ""), is_system=False)

    def verify_claims(self, claims: dict[str, Any]) -> bool:
        if not claims.get("sub"):
            return False
        if role_from_claims(claims) is None:
            self._refuse(claims, "no AIBox role in the provider's claims")
        return True

    def create_user(self, claims: dict[str, Any]) -> User:
        return user_sso_create(
            subject=claims["sub"],
            username=self._free_username(claims),
            email=claims.get("email", ""),
            first_name=claims.get("given_name", ""),
            last_name=claims.get("family_name", ""),
            role=role_from_claims(claims),
            issuer=settings.OIDC_ISSUER,
        )

    def update_user(self, user: User, claims: dict[str, Any]) -> User:
        if not user.is_active:
            self._refuse(claims, "the AIBox user is deactivated")
        user_sso_role_set(user=user, role=role_from_claims(claims), issuer=settings.OIDC_ISSUER)
        return user

    def _free_username(self, claims: dict[str, Any]) -> str:
        wanted = claims.get("preferred_username") or claims.get("email", "").split("@")[0]
        base = "".join(c for c in str(wanted) if c.isalnum() or c in "._-")[:140] or "user"
        name, n = base, 1
        while User.objects.filter(username=name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    @staticmethod
    def _refuse(claims: dict[str, Any], why: str) -> NoReturn:
        logger.warning("Single sign-on refused for subject %s: %s", claims.get("sub"), why)
        auth_login_failed(username=str(claims.get("preferred_username", "")), locked_out=False)
        raise SuspiciousOperation(f"Single sign-on refused: {why}.")


class SsoLoginView(OIDCAuthenticationRequestView):
    get_settings = staticmethod(oidc_setting)

    def get(self, request):
        if not sso_enabled():
            raise Http404("Single sign-on is not configured.")
        return super().get(request)


class SsoCallbackView(OIDCAuthenticationCallbackView):
    get_settings = staticmethod(oidc_setting)

    def get(self, request):
        if not sso_enabled():
            raise Http404("Single sign-on is not configured.")
        return super().get(request)

    def login_success(self):
        response = super().login_success()
        auth_login_succeeded(user=self.user)
        return response


class LocalPasswordBackend(ModelBackend):
    """Passwords, for everyone (AIBOX_LOCAL_LOGIN=on) or only break-glass users."""

    def user_can_authenticate(self, user: User) -> bool:
        if not super().user_can_authenticate(user):
            return False
        return settings.LOCAL_LOGIN == "on" or user.username in settings.BREAK_GLASS_USERS
