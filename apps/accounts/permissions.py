"""DRF permissions: the caller's role, and for API keys, the key's scopes."""

from __future__ import annotations

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from apps.accounts.models import ApiKey, Role, Scope


def _key(request: Request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


def role_and_scope(*roles: Role, scopes: tuple[Scope, ...] = ()) -> type[BasePermission]:
    """Allow users holding one of ``roles``; a key must also carry one of ``scopes``.

    A session (browser) caller is limited by role alone. ``admin`` scope counts as
    every scope, but never lifts a role limit.
    """

    class RoleAndScope(BasePermission):
        message = "Your role does not allow this action."

        def has_permission(self, request: Request, view) -> bool:
            user = request.user
            if user is None or not user.has_role(*roles):
                return False
            key = _key(request)
            if key is None or not scopes:
                return True
            if Scope.ADMIN in key.scopes or set(scopes) & set(key.scopes):
                return True
            self.message = (
                f"This API key lacks the scope for this action (needs one of: {', '.join(scopes)})."
            )
            return False

    return RoleAndScope


class NotFromAnotherSite(BasePermission):
    """For GETs that write an audit event (downloads): a browser session's request must
    not come from another site (its Fetch Metadata header says where it came from), since
    CSRF tokens protect only unsafe methods. API keys are never sent by a browser."""

    message = "Start this download from AIBox itself: requests from other sites are refused."

    def has_permission(self, request: Request, view) -> bool:
        if _key(request) is not None:
            return True
        return request.headers.get("Sec-Fetch-Site", "none") in ("same-origin", "none")
