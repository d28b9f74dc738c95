from __future__ import annotations

from django.db.models import QuerySet

from apps.accounts.models import ApiKey, User


def user_list() -> QuerySet[User]:
    return User.objects.filter(is_system=False).order_by("username")


def user_get(*, pk: int) -> User:
    return User.objects.get(pk=pk, is_system=False)


def api_key_list(*, user: User, include_all: bool = False) -> QuerySet[ApiKey]:
    """The caller's own keys; every key when an admin asks for all."""
    qs = ApiKey.objects.visible_to(user) if include_all else ApiKey.objects.filter(user=user)
    return qs.select_related("user")


def api_key_get(*, user: User, pk: int) -> ApiKey:
    """A key the user may see; others' keys do not exist for them (DoesNotExist → 404)."""
    return ApiKey.objects.visible_to(user).select_related("user").get(pk=pk)
