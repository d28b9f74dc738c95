"""Users, sign-in, API keys and usage limits: who may do what, and with which key.

About 500 lines on purpose: this is the one place where identities and their rights are
written (roles, users, sign-ins, keys, limits), each part small, and together what a
security review reads.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.models import (
    LIMIT_FIELDS,
    LIMIT_MAX_BUDGET,
    LIMIT_MAX_INT,
    SYSTEM_USERNAME,
    ApiKey,
    LimitPeriod,
    Role,
    Scope,
    UsageLimit,
    User,
)
from apps.audit.context import current_source
from apps.audit.models import Outcome
from apps.audit.services import audit_record

# Which scopes each role may put on its own keys.
ROLE_SCOPES: dict[str, frozenset[str]] = {
    Role.ADMIN: frozenset(Scope.values),
    Role.DATA_SCIENTIST: frozenset({Scope.INFERENCE, Scope.REGISTRY_READ, Scope.DATASETS}),
    Role.APP_DEVELOPER: frozenset({Scope.INFERENCE, Scope.REGISTRY_READ}),
    Role.COMPLIANCE_OFFICER: frozenset(
        {Scope.REGISTRY_READ, Scope.REGISTRY_REVIEW, Scope.AUDIT_READ, Scope.DATASETS}
    ),
}

API_KEY_PREFIX = "aibox"
# The cache (Redis) keys that mark an address's first refused login in a cool-off period.
LOGIN_DENIED_CACHE_PREFIX = "login-denied:"
# Refresh last_used_at at most this often, so a busy key does not write on every call.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def require_role(user: User, roles: Sequence[Role], doing: str) -> None:
    """Raise PermissionDenied unless ``user`` holds one of ``roles``. The system actor
    (management commands, Celery tasks) acts for the box itself and always may."""
    if not user.has_role(*roles) and not user.is_system:
        raise PermissionDenied(f"Your role does not allow you to {doing}.")


def system_user() -> User:
    """The actor for Celery tasks and management commands; it can never log in."""
    user, _ = User.objects.get_or_create(
        username=SYSTEM_USERNAME,
        defaults={
            "is_system": True,
            "is_active": False,
            "role": Role.ADMIN,
            "first_name": "AIBox",
            "last_name": "system",
            "password": make_password(None),
        },
    )
    return user


def _user_snapshot(user: User) -> dict[str, object]:
    return {
        "username": user.username,
        "email": user.email,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "role": user.role,
        "is_active": user.is_active,
    }


@transaction.atomic
def user_create(
    *,
    actor: User,
    username: str,
    role: Role,
    password: str,
    email: str = "",
    first_name: str = "",
    last_name: str = "",
) -> User:
    """Create an active user with a role and an initial password (admins only)."""
    require_role(actor, (Role.ADMIN,), "create users")
    if username.lower() == SYSTEM_USERNAME:
        raise ValidationError(f"The username {SYSTEM_USERNAME!r} is reserved.")
    user = User(
        username=username, role=role, email=email, first_name=first_name, last_name=last_name
    )
    user.set_password(password)
    user.full_clean()
    user.save()
    audit_record(actor=actor, action="user.create", target=user, details=_user_snapshot(user))
    return user


@transaction.atomic
def user_update(
    *,
    actor: User,
    user: User,
    role: Role,
    is_active: bool,
    email: str = "",
    first_name: str = "",
    last_name: str = "",
) -> User:
    """Change a user's profile, role or active flag; records exactly what changed.

    Admins cannot demote or deactivate themselves, so the box always keeps an admin
    who can log in.
    """
    if user.pk == actor.pk and (role != Role.ADMIN or not is_active):
        raise ValidationError("You cannot remove your own admin role or deactivate yourself.")
    if user.is_system:
        raise ValidationError("The built-in system user cannot be edited.")
    before = _user_snapshot(user)
    user.role, user.is_active = role, is_active
    user.email, user.first_name, user.last_name = email, first_name, last_name
    user.full_clean()
    user.save()
    after = _user_snapshot(user)
    changes = {k: {"from": before[k], "to": after[k]} for k in after if before[k] != after[k]}
    if not changes:
        return user
    if "role" in changes:
        action = "user.role_change"
    elif "is_active" in changes:
        action = "user.deactivate" if not is_active else "user.reactivate"
    else:
        action = "user.update"
    audit_record(actor=actor, action=action, target=user, details={"changes": changes})
    return user


@transaction.atomic
def user_set_password(*, actor: User, user: User, password: str) -> None:
    """Set a new password (the caller validated it); the hash never reaches the log.
    Users change their own; only an admin sets another user's."""
    if actor.pk != user.pk:
        require_role(actor, (Role.ADMIN,), "set other users' passwords")
    user.set_password(password)
    user.save(update_fields=["password"])
    action = "user.password_change" if actor.pk == user.pk else "user.password_reset"
    audit_record(actor=actor, action=action, target=user)


def auth_login_succeeded(*, user: User) -> None:
    audit_record(actor=user, action="auth.login", target=user)


def auth_login_failed(*, username: str, locked_out: bool) -> None:
    """Audit a failed login, in bounded numbers and without storing what was typed.

    Before a lockout every failure is an event (django-axes locks a username at one
    address, and an address, after AIBOX_LOGIN_FAILURE_LIMIT of them). While locked out,
    only the first refusal from an address in each cool-off period is; axes counts the
    rest. So no one can flood the log, which every write takes a lock on. A name that is
    no user's (often a password typed into the wrong field) is kept only as a keyed
    digest, which still shows repeated attempts with the same name.
    """
    source = current_source()
    address = source.ip if source is not None else None
    if locked_out:
        first = cache.add(
            f"{LOGIN_DENIED_CACHE_PREFIX}{address}",
            1,
            timeout=int(settings.AXES_COOLOFF_TIME.total_seconds()),
        )
        if not first:
            return
    user = User.objects.filter(username=username).first()
    typed = username if user else f"unknown user {typed_name_digest(username)}"
    audit_record(
        actor=None,
        actor_label=f"anonymous (as {typed!r})"[:200],
        action="auth.login_failed",
        target=user,
        target_type="" if user else "accounts.user",
        target_label="" if user else typed,
        outcome=Outcome.DENIED if locked_out else Outcome.FAILURE,
        details={"locked_out": locked_out, "known_user": user is not None},
    )


def typed_name_digest(name: str) -> str:
    """A short keyed digest of a name typed at login that belongs to no user."""
    key = f"login-name:{settings.SECRET_KEY}".encode()
    return hmac.new(key, name.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def user_sso_create(
    *,
    subject: str,
    username: str,
    email: str,
    first_name: str,
    last_name: str,
    role: str,
    issuer: str,
) -> User:
    """A person's first single sign-on: their user, with no password, audited."""
    with transaction.atomic():
        user = User(
            username=username,
            email=email[:254],
            first_name=first_name[:150],
            last_name=last_name[:150],
            role=role,
            oidc_subject=subject,
        )
        user.set_unusable_password()
        user.save()
        audit_record(
            actor=user,
            action="user.sso_create",
            target=user,
            details={"role": role, "issuer": issuer},
        )
    return user


def user_sso_role_set(*, user: User, role: str, issuer: str) -> None:
    """The role the identity provider's groups give at this sign-in; audited if it changed."""
    if role == user.role:
        return
    with transaction.atomic():
        previous, user.role = user.role, role
        user.save(update_fields=["role"])
        audit_record(
            actor=user,
            action="user.sso_role_change",
            target=user,
            details={"from": previous, "to": role, "issuer": issuer},
        )


def auth_logout(*, user: User) -> None:
    audit_record(actor=user, action="auth.logout", target=user)


# --- API keys ---------------------------------------------------------------


def _key_hash(raw_key: str) -> str:
    return hmac.new(
        settings.API_KEY_HMAC_KEY.encode(), raw_key.encode(), hashlib.sha256
    ).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # the full key; shown to the user once and never stored


@transaction.atomic
def api_key_create(
    *,
    actor: User,
    owner: User,
    name: str,
    scopes: list[str],
    deployments: list[str] | None = None,
    expires_at: datetime | None = None,
) -> IssuedKey:
    """Issue a key for ``owner`` (themselves, or anyone when ``actor`` is an admin).

    The returned secret is ``aibox_<prefix>_<random>``; the database keeps the prefix
    and an HMAC-SHA256 of the whole key under a server-side key, never the secret.
    """
    if owner.pk != actor.pk and actor.role != Role.ADMIN:
        raise ValidationError("Only admins can create keys for other users.")
    if not name.strip():
        raise ValidationError("Give the key a name.")
    scopes = sorted(set(scopes))
    if not scopes:
        raise ValidationError("Choose at least one scope.")
    unknown = set(scopes) - set(Scope.values)
    if unknown:
        raise ValidationError(f"Unknown scope(s): {', '.join(sorted(unknown))}.")
    not_allowed = set(scopes) - ROLE_SCOPES[owner.role]
    if not_allowed:
        raise ValidationError(
            f"A {owner.get_role_display().lower()} cannot hold the scope(s): "
            f"{', '.join(sorted(not_allowed))}."
        )
    deployments = sorted({d.strip() for d in deployments or [] if d.strip()})
    if deployments and Scope.INFERENCE not in scopes:
        raise ValidationError("Deployment names only apply to the inference scope.")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError("The expiry must be in the future.")
    prefix = secrets.token_hex(6)
    secret = f"{API_KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(
        user=owner,
        name=name.strip(),
        prefix=prefix,
        secret_hash=_key_hash(secret),
        scopes=scopes,
        deployments=deployments,
        expires_at=expires_at,
    )
    audit_record(
        actor=actor,
        action="apikey.create",
        target=api_key,
        details={
            "owner": owner.username,
            "prefix": prefix,
            "scopes": scopes,
            "deployments": deployments,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return IssuedKey(api_key=api_key, secret=secret)


@transaction.atomic
def api_key_revoke(*, actor: User, api_key: ApiKey) -> ApiKey:
    """Revoke a key at once; revoking twice is a no-op that writes nothing. Users revoke
    their own keys; only an admin revokes another user's."""
    if api_key.user_id != actor.pk:
        require_role(actor, (Role.ADMIN,), "revoke other users' API keys")
    if api_key.revoked_at is not None:
        return api_key
    api_key.revoked_at = timezone.now()
    api_key.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        action="apikey.revoke",
        target=api_key,
        details={"owner": api_key.user.username, "prefix": api_key.prefix},
    )
    return api_key


class ApiKeyRejected(Exception):
    """The presented key is unusable; the message is safe to show the caller."""


def api_key_authenticate(*, raw_key: str) -> ApiKey:
    """Resolve a presented key to its row, or raise ApiKeyRejected saying why."""
    parts = raw_key.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX:
        raise ApiKeyRejected("Malformed API key.")
    api_key = ApiKey.objects.select_related("user").filter(prefix=parts[1]).first()
    # Compare against a hash even when the prefix is unknown, so timing says nothing.
    expected = api_key.secret_hash if api_key else "0" * 64
    if not hmac.compare_digest(expected, _key_hash(raw_key)) or api_key is None:
        raise ApiKeyRejected("Invalid API key.")
    if api_key.revoked_at is not None:
        raise ApiKeyRejected("This API key has been revoked.")
    if api_key.is_expired:
        raise ApiKeyRejected("This API key has expired.")
    if not api_key.user.is_active:
        raise ApiKeyRejected("The owner of this API key is deactivated.")
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key


# --- usage limits on the inference API ----------------------------------------


def _limit_subject(
    *, api_key: ApiKey | None, user: User | None, role: str | None
) -> dict[str, object]:
    """The one subject a limit row is for, as the row's filter; refuses anything else."""
    given = {
        name: value
        for name, value in (("api_key", api_key), ("user", user), ("role", role))
        if value is not None
    }
    if len(given) != 1:
        raise ValidationError("Name exactly one of an API key, a user or a role.")
    if role is not None and role not in Role.values:
        raise ValidationError({"role": [f"Unknown role {role!r}."]})
    if user is not None and user.is_system:
        raise ValidationError("The built-in system user does not call the inference API.")
    return given


def _limit_audit_target(subject: dict[str, object]) -> dict[str, object]:
    if "role" in subject:
        role = Role(subject["role"])
        return {"target_type": "accounts.role", "target_id": role.value, "target_label": role.label}
    return {"target": next(iter(subject.values()))}


def _limit_values_check(values: dict[str, int | str | None]) -> None:
    errors: dict[str, list[str]] = {}
    for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent", "token_budget"):
        value = values[name]
        ceiling = LIMIT_MAX_BUDGET if name == "token_budget" else LIMIT_MAX_INT
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
            errors[name] = [f"Must be a whole number from 1 to {ceiling}, or empty for no limit."]
    period = values["budget_period"]
    if period is not None and period not in LimitPeriod.values:
        errors["budget_period"] = [f"Must be one of: {', '.join(LimitPeriod.values)}."]
    elif (values["token_budget"] is None) != (period is None):
        errors["budget_period" if period is None else "token_budget"] = [
            "A token budget needs its period (day or month), and a period needs a budget."
        ]
    if errors:
        raise ValidationError(errors)


@transaction.atomic
def limit_set(
    *,
    actor: User,
    api_key: ApiKey | None = None,
    user: User | None = None,
    role: str | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent: int | None = None,
    token_budget: int | None = None,
    budget_period: str | None = None,
) -> UsageLimit | None:
    """Replace the inference limits of one API key, user or role (admins only).

    Every value is replaced: one left out (``None``) sets no limit at this level, so
    the caller falls back to the user's or the role's value. All of them ``None``
    removes the row, as ``limit_clear`` does, and returns ``None``. Audited with the
    values before and after; saving the same values again writes nothing.
    """
    require_role(actor, [Role.ADMIN], "set usage limits")
    subject = _limit_subject(api_key=api_key, user=user, role=role)
    values: dict[str, int | str | None] = {
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
        "max_concurrent": max_concurrent,
        "token_budget": token_budget,
        "budget_period": budget_period,
    }
    _limit_values_check(values)
    if all(value is None for value in values.values()):
        limit_clear(actor=actor, api_key=api_key, user=user, role=role)
        return None
    row = UsageLimit.objects.select_for_update().filter(**subject).first()
    before = row.values() if row is not None else dict.fromkeys(LIMIT_FIELDS)
    if before == values:
        return row
    if row is None:
        row = UsageLimit(**subject)
    for name, value in values.items():
        setattr(row, name, value)
    row.updated_at = timezone.now()
    row.save()
    audit_record(
        actor=actor,
        action="limit.set",
        **_limit_audit_target(subject),
        details={"subject": next(iter(subject)), "before": before, "after": values},
    )
    return row


@transaction.atomic
def limit_clear(
    *,
    actor: User,
    api_key: ApiKey | None = None,
    user: User | None = None,
    role: str | None = None,
) -> None:
    """Remove the inference limits of one API key, user or role (admins only), so the
    caller falls back to the next level's. Clearing what is not set writes nothing."""
    require_role(actor, [Role.ADMIN], "clear usage limits")
    subject = _limit_subject(api_key=api_key, user=user, role=role)
    row = UsageLimit.objects.select_for_update().filter(**subject).first()
    if row is None:
        return
    before = row.values()
    row.delete()
    audit_record(
        actor=actor,
        action="limit.clear",
        **_limit_audit_target(subject),
        details={"subject": next(iter(subject)), "before": before},
    )
