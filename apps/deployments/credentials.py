"""Worker credentials: what a serving worker on another host presents to pull artifacts.

Admins issue and revoke them (``manage.py worker_credential``, the API); each change is
one transaction with one audit event, which never holds the secret. A worker sends its
secret as ``Authorization: Bearer aibw_…`` to ``/internal/v1/artifacts/<sha256>``
(``apps/deployments/internal.py``); it is not a user session and not an API key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.accounts.services import require_role
from apps.audit.services import audit_record
from apps.deployments.models import WorkerCredential

SECRET_PREFIX = "aibw_"  # noqa: S105 - the public prefix, not a secret
# last_used_at is rewritten at most this often per credential (a pull is many requests
# when it resumes; the column says "in use lately", not each request).
LAST_USED_RESOLUTION = timedelta(seconds=60)


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedCredential:
    credential: WorkerCredential
    secret: str  # shown once, never stored


@transaction.atomic
def worker_credential_issue(*, actor: User, name: str) -> IssuedCredential:
    """Issue a credential for the worker (or host) ``name``; admins only.

    The secret is ``aibw_`` and 256 random bits; only its SHA-256 is kept. A name holds
    one active credential: revoke the old one to issue a new one under the same name.
    """
    require_role(actor, (Role.ADMIN,), "issue worker credentials")
    name = name.strip()
    if not name or len(name) > 200:
        raise ValidationError("Give the worker credential a name (up to 200 characters).")
    if WorkerCredential.objects.active().filter(name=name).exists():
        raise ValidationError(
            f"The worker {name!r} already has an active credential; revoke it first."
        )
    secret = f"{SECRET_PREFIX}{secrets.token_urlsafe(32)}"
    try:
        with transaction.atomic():
            credential = WorkerCredential.objects.create(
                name=name, secret_hash=_secret_hash(secret), created_by=actor
            )
    except IntegrityError as exc:  # issued concurrently under the same name
        raise ValidationError(f"The worker {name!r} already has an active credential.") from exc
    audit_record(actor=actor, action="worker_credential.issued", target=credential)
    return IssuedCredential(credential=credential, secret=secret)


@transaction.atomic
def worker_credential_revoke(*, actor: User, credential: WorkerCredential) -> WorkerCredential:
    """Revoke a credential at once (its next request is refused); admins only.
    Revoking twice is a no-op that writes nothing."""
    require_role(actor, (Role.ADMIN,), "revoke worker credentials")
    credential = WorkerCredential.objects.select_for_update().get(pk=credential.pk)
    if credential.revoked_at is not None:
        return credential
    credential.revoked_at = timezone.now()
    credential.save(update_fields=["revoked_at"])
    audit_record(actor=actor, action="worker_credential.revoked", target=credential)
    return credential


class CredentialRejected(Exception):
    """The presented credential is unusable; the message is safe to show the caller."""


def worker_credential_authenticate(*, authorization: str) -> WorkerCredential:
    """Resolve an ``Authorization`` header to an active credential, or raise
    CredentialRejected saying why. Marks it used (at most once a minute)."""
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise CredentialRejected("Send a worker credential as 'Authorization: Bearer aibw_…'.")
    if not secret.startswith(SECRET_PREFIX):
        raise CredentialRejected("That is not a worker credential.")
    digest = _secret_hash(secret)
    credential = WorkerCredential.objects.filter(secret_hash=digest).first()
    # The lookup is by hash; compare again in constant time for good measure.
    if credential is None or not hmac.compare_digest(credential.secret_hash, digest):
        raise CredentialRejected("Unknown worker credential.")
    if credential.revoked_at is not None:
        raise CredentialRejected(f"The worker credential {credential.name!r} was revoked.")
    now = timezone.now()
    if credential.last_used_at is None or now - credential.last_used_at > LAST_USED_RESOLUTION:
        WorkerCredential.objects.filter(pk=credential.pk).update(last_used_at=now)
        credential.last_used_at = now
    return credential


def artifact_pull_record(*, credential: WorkerCredential, sha256: str, length: int) -> None:
    """Audit a worker starting to pull an artifact (the actor is the credential's worker)."""
    audit_record(
        actor=None,
        actor_label=f"worker:{credential.name}",
        action="artifact.pulled",
        target_type="registry.artifact",
        target_id=sha256,
        target_label=sha256[:12],
        details={"worker_credential": credential.name, "bytes": length},
    )
