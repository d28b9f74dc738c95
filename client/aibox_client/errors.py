"""What can go wrong, as exceptions: one class per kind of refusal the REST API answers,
each carrying the server's own message (the API's shared ``Error`` body: ``detail``, and
for a refused field its messages under its name), plus what happens on the way there."""

from __future__ import annotations

from typing import Any

import httpx


class AIBoxError(Exception):
    """Anything the client could not do. ``message`` is the server's ``detail`` when the
    server answered; ``status`` its HTTP status (``None`` when it never answered)."""

    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: Any = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.body = body
        self.method = method
        self.url = url

    @property
    def fields(self) -> dict[str, Any]:
        """A 400's messages per refused field (``{"name": ["This field is required."]}``)."""
        if isinstance(self.body, dict):
            return {k: v for k, v in self.body.items() if k != "detail"}
        return {}

    def __str__(self) -> str:
        where = f" ({self.method} {self.url})" if self.method else ""
        code = f"{self.status} " if self.status is not None else ""
        return f"{code}{self.message}{where}" if code or where else self.message


class BadRequest(AIBoxError):
    """400: the request was refused; ``message`` says why and ``fields`` names the fields."""

    status = 400


# The same thing by the name form libraries use.
ValidationError = BadRequest


class AuthenticationError(AIBoxError):
    """401: no valid API key (missing, malformed, unknown, revoked or expired)."""

    status = 401


class PermissionDenied(AIBoxError):
    """403: the key's role or scopes do not allow this call."""

    status = 403


class NotFound(AIBoxError):
    """404: nothing there, or nothing this key may see."""

    status = 404


class Conflict(AIBoxError):
    """409: the request conflicts with what the box holds (a recipe's missing model)."""

    status = 409


class PayloadTooLarge(AIBoxError):
    """413: the body is over the route's limit; the box refused it before reading it."""

    status = 413


class RateLimited(AIBoxError):
    """429: over a usage limit."""

    status = 429


class ServerError(AIBoxError):
    """5xx: the box could not do it (``message`` says why when it said)."""

    status = 500


class InsufficientStorage(ServerError):
    """507: the box's disk filled during an upload; nothing was kept."""

    status = 507


class ConnectionFailed(AIBoxError):
    """The box could not be reached, or the connection dropped before it answered."""


class UploadInterrupted(ConnectionFailed):
    """An upload's connection dropped and every retry allowed dropped too."""

    def __init__(self, message: str, *, attempts: int, sent: int, total: int) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.sent = sent
        self.total = total


class JobFailed(AIBoxError):
    """A job the client waited for ended ``failed`` or ``cancelled``; ``job`` is its last
    state and ``message`` the box's reason."""

    def __init__(self, message: str, *, job: dict[str, Any]) -> None:
        super().__init__(message)
        self.job = job


class VerificationFailed(AIBoxError):
    """A signed audit export did not verify; ``problems`` lists what was found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class MissingExtra(AIBoxError):
    """An optional dependency is not installed (``pip install 'aibox-client[extra]'``)."""


_BY_STATUS: dict[int, type[AIBoxError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    507: InsufficientStorage,
}


def error_for_status(status: int, message: str, **kwargs: Any) -> AIBoxError:
    """The exception class for an HTTP status, made with ``message``."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else AIBoxError)
    return cls(message, status=status, **kwargs)


def error_from_response(response: httpx.Response) -> AIBoxError:
    """The exception for an error response, with the server's message."""
    body: Any = None
    message = ""
    try:
        body = response.json()
    except ValueError:
        message = response.text.strip()[:500]
    if isinstance(body, dict):
        if isinstance(body.get("detail"), str):
            message = body["detail"]
        elif isinstance(body.get("error"), dict):  # /v1/'s OpenAI-shaped errors
            message = str(body["error"].get("message", ""))
    status = response.status_code
    return error_for_status(
        status,
        message or response.reason_phrase or f"HTTP {status}",
        body=body,
        method=response.request.method,
        url=str(response.request.url),
    )
