from __future__ import annotations

from django.http import HttpRequest
from django.urls import reverse

from apps.accounts.models import Role

# (label, url name, roles that see it; empty = everyone signed in)
NAVIGATION: tuple[tuple[str, str, tuple[Role, ...]], ...] = (
    ("Dashboard", "core:home", ()),
    ("Models", "registry:repos", ()),
    ("Datasets", "datasets:list", (Role.ADMIN, Role.DATA_SCIENTIST, Role.COMPLIANCE_OFFICER)),
    ("Fine-tunes", "finetune:list", (Role.ADMIN, Role.DATA_SCIENTIST, Role.COMPLIANCE_OFFICER)),
    ("Deployments", "deployments:list", ()),
    ("Setups", "setups:list", ()),
    ("Playground", "deployments:playground", (Role.ADMIN, Role.DATA_SCIENTIST, Role.APP_DEVELOPER)),
    ("Usage", "inference:usage", ()),
    ("API keys", "accounts:api_keys", ()),
    ("Users", "accounts:user_list", (Role.ADMIN,)),
    ("Limits", "accounts:limit_list", (Role.ADMIN,)),
    ("Audit log", "audit:list", (Role.ADMIN, Role.COMPLIANCE_OFFICER)),
)


def navigation(request: HttpRequest) -> dict:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"nav_items": []}
    items = [
        {
            "label": label,
            "url": reverse(name),
            "active": request.path.startswith(reverse(name))
            if name != "core:home"
            else request.path == "/",
        }
        for label, name, roles in NAVIGATION
        if not roles or user.has_role(*roles)
    ]
    return {"nav_items": items}
