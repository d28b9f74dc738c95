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
