from __future__ import annotations

from django.contrib.auth.models import AbstractUser, UserManager
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.utils import timezone

SYSTEM_USERNAME = "system"


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    DATA_SCIENTIST = "data_scientist", "Data scientist"
    APP_DEVELOPER = "app_developer", "App developer"
    COMPLIANCE_OFFICER = "compliance_officer", "Compliance officer"


class User(AbstractUser):
    """A person (or the built-in ``system`` actor) with exactly one role."""

    role = models.CharField(max_length=32, choices=Role.choices, default=Role.APP_DEVELOPER)
    is_system = models.BooleanField(
        default=False, help_text="The built-in actor for tasks and commands; cannot log in."
    )
    # The identity provider's stable id for this person (single sign-on), if they use it.
    oidc_subject = models.CharField(max_length=255, null=True, blank=True, unique=True)

    objects = UserManager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(role__in=Role.values), name="accounts_user_role_valid"
            ),
        ]

    @property
    def display_name(self) -> str:
        return self.get_full_name() or self.username

    def has_role(self, *roles: Role) -> bool:
        return self.is_authenticated and self.is_active and self.role in roles


class Scope(models.TextChoices):
    INFERENCE = "inference", "Inference (all or named deployments)"
    REGISTRY_READ = "registry:read", "Read-only registry"
    REGISTRY_REVIEW = "registry:review", "Approve or deprecate model versions"
    DATASETS = "datasets", "Datasets (read, upload and derive)"
    AUDIT_READ = "audit:read", "Read the audit log"
    METRICS = "metrics", "Prometheus metrics (/metrics)"
    ADMIN = "admin", "Administration"


class ApiKeyQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> ApiKeyQuerySet:
        if user.role == Role.ADMIN:
            return self
        return self.filter(user=user)

    def usable(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        )


class ApiKey(models.Model):
    """An API key. The secret is shown once; only a keyed hash of it is stored."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, help_text="Public part, shown in lists.")
    secret_hash = models.CharField(max_length=64, help_text="HMAC-SHA256 of the whole key.")
    scopes = ArrayField(models.CharField(max_length=32, choices=Scope.choices))
    # Empty means every deployment; only meaningful with the inference scope.
    deployments = ArrayField(models.CharField(max_length=100), default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.is_expired:
            return "expired"
        return "active"

    def allows_deployment(self, name: str) -> bool:
        return Scope.INFERENCE in self.scopes and (not self.deployments or name in self.deployments)


class LimitPeriod(models.TextChoices):
    DAY = "day", "Day (UTC)"
    MONTH = "month", "Month (UTC)"


# The ceilings of the limit columns (PositiveIntegerField, PositiveBigIntegerField).
LIMIT_MAX_INT = 2**31 - 1
LIMIT_MAX_BUDGET = 2**63 - 1

# The values a usage limit row holds, in the order forms and the API show them.
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "token_budget",
    "budget_period",
)


class UsageLimitQuerySet(models.QuerySet):
    def for_caller(self, *, user: User, api_key: ApiKey | None) -> UsageLimitQuerySet:
        """The rows that can apply to a call: the key's, its owner's and the role's."""
        subjects = Q(user=user) | Q(role=user.role)
        if api_key is not None:
            subjects |= Q(api_key=api_key)
        return self.filter(subjects)


class UsageLimit(models.Model):
    """Limits on the inference API (/v1/) for one API key, one user or one role.

    A user's and a role's rows are defaults: each field of a caller's effective limits
    comes from the key's row, else the user's, else the role's (a budget and its period
    go together). An empty field sets nothing at that level.
    """

    api_key = models.ForeignKey(
        ApiKey, on_delete=models.CASCADE, null=True, blank=True, related_name="usage_limits"
    )
    user = models.ForeignKey(
        User, on_delete=models.CASCADE, null=True, blank=True, related_name="usage_limits"
    )
    # NULL, not "", is "not set" for these two: the constraints below read it so, and
    # the API, the dataclasses and the Lua arguments all say None.
    role = models.CharField(  # noqa: DJ001
        max_length=32, choices=Role.choices, null=True, blank=True
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_concurrent = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests (streamed or not) in flight at once."
    )
    token_budget = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Prompt and completion tokens per budget period."
    )
    budget_period = models.CharField(  # noqa: DJ001
        max_length=8, choices=LimitPeriod.choices, null=True, blank=True
    )
    updated_at = models.DateTimeField(default=timezone.now)

    objects = UsageLimitQuerySet.as_manager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(api_key__isnull=False, user__isnull=True, role__isnull=True)
                | Q(api_key__isnull=True, user__isnull=False, role__isnull=True)
                | Q(api_key__isnull=True, user__isnull=True, role__isnull=False),
                name="accounts_usagelimit_one_subject",
            ),
            models.UniqueConstraint(
                fields=["api_key"],
                condition=Q(api_key__isnull=False),
                name="accounts_usagelimit_unique_api_key",
            ),
            models.UniqueConstraint(
                fields=["user"],
                condition=Q(user__isnull=False),
                name="accounts_usagelimit_unique_user",
            ),
            models.UniqueConstraint(
                fields=["role"],
                condition=Q(role__isnull=False),
                name="accounts_usagelimit_unique_role",
            ),
            models.CheckConstraint(
                condition=Q(role__isnull=True) | Q(role__in=Role.values),
                name="accounts_usagelimit_role_valid",
            ),
            models.CheckConstraint(
                condition=Q(token_budget__isnull=True, budget_period__isnull=True)
                # IN on a NULL is NULL, which a CHECK lets through: hence isnull too.
                | Q(
                    token_budget__isnull=False,
                    budget_period__isnull=False,
                    budget_period__in=LimitPeriod.values,
                ),
                name="accounts_usagelimit_budget_with_period",
            ),
            # Zero would refuse every call: revoking the key says that more clearly.
            models.CheckConstraint(
                condition=(Q(requests_per_minute__isnull=True) | Q(requests_per_minute__gte=1))
                & (Q(tokens_per_minute__isnull=True) | Q(tokens_per_minute__gte=1))
                & (Q(max_concurrent__isnull=True) | Q(max_concurrent__gte=1))
                & (Q(token_budget__isnull=True) | Q(token_budget__gte=1)),
                name="accounts_usagelimit_values_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"limits for {self.subject_label}"

    @property
    def subject_kind(self) -> str:
        if self.api_key_id is not None:
            return "api_key"
        return "user" if self.user_id is not None else "role"

    @property
    def subject_label(self) -> str:
        return limit_subject_label(api_key=self.api_key, user=self.user, role=self.role)

    def values(self) -> dict[str, int | str | None]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}


def limit_subject_label(
    *, api_key: ApiKey | None = None, user: User | None = None, role: str | None = None
) -> str:
    """How pages, the API and the audit log name the subject of limits."""
    if api_key is not None:
        return f"API key {api_key} of {api_key.user.username}"
    if user is not None:
        return f"user {user.username}"
    return f"role {Role(role).label}"
