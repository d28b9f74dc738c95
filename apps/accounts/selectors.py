from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import QuerySet

from apps.accounts.models import (
    LIMIT_FIELDS,
    ApiKey,
    Role,
    UsageLimit,
    User,
    limit_subject_label,
)


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


# --- usage limits ---------------------------------------------------------------


def usage_limit_list() -> QuerySet[UsageLimit]:
    """Every limit row: roles first, then users, then keys."""
    return UsageLimit.objects.select_related("api_key__user", "user").order_by(
        "role", "user__username", "api_key__user__username", "api_key__name"
    )


def usage_limit_get(
    *, api_key: ApiKey | None = None, user: User | None = None, role: str | None = None
) -> UsageLimit | None:
    """The row set on exactly this subject (not what it inherits), if any."""
    subject = {"api_key": api_key, "user": user, "role": role}
    return (
        UsageLimit.objects.select_related("api_key__user", "user")
        .filter(**{name: value for name, value in subject.items() if value is not None})
        .first()
    )


# Which level wins for each field: the key's own row, then its owner's, then the role's.
_PRECEDENCE = ("api_key", "user", "role")


@dataclass(frozen=True)
class EffectiveLimits:
    """A caller's limits, field by field, and the level each value comes from."""

    values: dict[str, int | str | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def usage_limit_effective(*, user: User, api_key: ApiKey | None) -> EffectiveLimits:
    """The limits that apply to ``user`` calling with ``api_key`` (None: a session), in one
    query. A budget and its period are one value: they come from the same level."""
    rows = {
        row.subject_kind: row for row in UsageLimit.objects.for_caller(user=user, api_key=api_key)
    }
    values: dict[str, int | str | None] = dict.fromkeys(LIMIT_FIELDS)
    sources: dict[str, str] = {}
    for name in LIMIT_FIELDS:
        if name == "budget_period":
            continue
        for level in _PRECEDENCE:
            row = rows.get(level)
            if row is not None and getattr(row, name) is not None:
                values[name] = getattr(row, name)
                sources[name] = level
                if name == "token_budget":
                    values["budget_period"] = row.budget_period
                    sources["budget_period"] = level
                break
    return EffectiveLimits(values=values, sources=sources)


@dataclass(frozen=True)
class SubjectLimits:
    """One subject's own limits row (None: nothing set on it) and, for a key or a user,
    the limits in effect for it (a user's: for their browser session)."""

    kind: str  # "api_key", "user" or "role"
    label: str
    row: UsageLimit | None
    effective: EffectiveLimits | None

    @property
    def values(self) -> dict[str, int | str | None]:
        return self.row.values() if self.row is not None else dict.fromkeys(LIMIT_FIELDS)


def usage_limit_subject(
    *, api_key: ApiKey | None = None, user: User | None = None, role: str | None = None
) -> SubjectLimits:
    """The limits of exactly one of an API key, a user or a role."""
    if api_key is not None:
        kind = "api_key"
        effective = usage_limit_effective(user=api_key.user, api_key=api_key)
    elif user is not None:
        kind = "user"
        effective = usage_limit_effective(user=user, api_key=None)
    else:
        kind, effective = "role", None
    return SubjectLimits(
        kind=kind,
        label=limit_subject_label(api_key=api_key, user=user, role=role),
        row=usage_limit_get(api_key=api_key, user=user, role=role),
        effective=effective,
    )


@dataclass(frozen=True)
class LimitOverview:
    """Every role, every user and every usable key, each with its own row (or None)."""

    roles: list[tuple[Role, UsageLimit | None]]
    users: list[tuple[User, UsageLimit | None]]
    api_keys: list[tuple[ApiKey, UsageLimit | None]]


def usage_limit_overview() -> LimitOverview:
    rows = list(UsageLimit.objects.all())
    by_role = {row.role: row for row in rows if row.role is not None}
    by_user = {row.user_id: row for row in rows if row.user_id is not None}
    by_key = {row.api_key_id: row for row in rows if row.api_key_id is not None}
    # Revoked and expired keys call nothing; those with limits still show, to be cleared.
    keys = ApiKey.objects.select_related("user").order_by("user__username", "name")
    keys = keys.filter(pk__in=by_key) | keys.usable()
    return LimitOverview(
        roles=[(role, by_role.get(role.value)) for role in Role],
        users=[(user, by_user.get(user.pk)) for user in user_list()],
        api_keys=[(key, by_key.get(key.pk)) for key in keys],
    )
