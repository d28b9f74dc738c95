"""The box's Ed25519 key that signs audit exports, reports, dossiers and checkpoints.

Kept in ``settings.AUDIT_SIGNING_KEY_FILE`` (PKCS#8 PEM, mode 0600). It is created once,
on purpose and audited (``manage.py audit_signing_key --create``, which bin/aibox run
and the Compose web service call), never on first use: a key file that went missing
(a container recreated without its volume, say) must stop signing with a clear error,
not be silently replaced by a new key that no earlier export verifies against.

The private key never leaves this module: not in logs, pages, exports or audit details.
Only the public key and its fingerprint (sha256 of the 32 raw public-key bytes, hex)
are shown.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def pem(self) -> str:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


class SigningKeyMissing(ImproperlyConfigured):
    """The key file is not there: restore it, or create the box's first one."""


def create_key(path: Path) -> PublicKey:
    """Write a new key to ``path``; FileExistsError if one is there (O_EXCL, so two
    processes at once cannot write two keys). Audited by the service that calls it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    _key.cache_clear()
    return _public(key)


def _load(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyMissing(
            f"The audit signing key {path} is missing. Restore it from backup "
            "(docs/operator-guide.md, Backups); on a new box, create it with "
            "'manage.py audit_signing_key --create'."
        ) from None
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ImproperlyConfigured(f"{path} does not hold an Ed25519 private key.")
    return key


def _public(key: Ed25519PrivateKey) -> PublicKey:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw)


@lru_cache(maxsize=4)
def _key(path: str) -> Ed25519PrivateKey:
    return _load(Path(path))


def _current_key() -> Ed25519PrivateKey:
    return _key(str(settings.AUDIT_SIGNING_KEY_FILE))


def sign(message: bytes) -> str:
    """The base64 Ed25519 signature of ``message`` by the box's key."""
    return base64.b64encode(_current_key().sign(message)).decode("ascii")


def public_key() -> PublicKey:
    return _public(_current_key())
