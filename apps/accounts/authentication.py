from __future__ import annotations

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from apps.accounts.models import ApiKey, User
from apps.accounts.services import ApiKeyRejected, api_key_authenticate


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer aibox_<prefix>_<secret>``; sets ``request.auth`` to the ApiKey."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiKey] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != self.keyword.lower():
            return None
        raw_key = raw_key.strip()
        if not raw_key:
            raise exceptions.AuthenticationFailed("No API key after 'Bearer'.")
        try:
            api_key = api_key_authenticate(raw_key=raw_key)
        except ApiKeyRejected as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from exc
        return api_key.user, api_key

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) with a WWW-Authenticate challenge.
        return f'{self.keyword} realm="aibox"'
