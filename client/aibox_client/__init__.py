"""A Python client for AIBox's REST API, and the ``aibox`` command line built on it.

    from aibox_client import AIBox
    box = AIBox("http://box:8000", "aibox_...")   # or AIBox.from_env()
    box.datasets()

docs/client.md walks through it."""

from aibox_client.client import AIBox
from aibox_client.errors import (
    AIBoxError,
    AuthenticationError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    InsufficientStorage,
    JobFailed,
    MissingExtra,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    UploadInterrupted,
    ValidationError,
    VerificationFailed,
)
from aibox_client.verify import Verification, verify_export

__version__ = "0.1.0"

__all__ = [
    "AIBox",
    "AIBoxError",
    "AuthenticationError",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "InsufficientStorage",
    "JobFailed",
    "MissingExtra",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "UploadInterrupted",
    "ValidationError",
    "Verification",
    "VerificationFailed",
    "verify_export",
]
