"""The box's Ed25519 key that signs audit exports, reports and dossiers.

Generated on first use into ``settings.AUDIT_SIGNING_KEY_FILE`` (PKCS#8 PEM, mode 0600,
created with O_EXCL so two processes starting at once cannot write two keys). The
private key never leaves this module: not in logs, pages, exports or audit details.
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


def _load_or_create(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            data = path.read_bytes()  # another process won the race; use its key
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            return key
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key.")
    return key


@lru_cache(maxsize=4)
def _key(path: str) -> Ed25519PrivateKey:
    return _load_or_create(Path(path))


def _current_key() -> Ed25519PrivateKey:
    return _key(str(settings.AUDIT_SIGNING_KEY_FILE))


def sign(message: bytes) -> str:
    """The base64 Ed25519 signature of ``message`` by the box's key."""
    return base64.b64encode(_current_key().sign(message)).decode("ascii")


def public_key() -> PublicKey:
    raw = (
        _current_key()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return PublicKey(raw)
