"""The REST API's (/api/v1/) shared conventions: what a request body may be, how a
service's refusal becomes a response, and how the OpenAPI schema describes those errors.
Views call services and let these errors rise."""

from __future__ import annotations

import copy

from django.core.exceptions import PermissionDenied, ValidationError
from rest_framework import status
from rest_framework.exceptions import ParseError
from rest_framework.exceptions import ValidationError as DRFValidationError
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from workers.artifacts import ArtifactError


class JSONObjectParser(JSONParser):
    """JSON whose top level is an object: every API operation takes named fields, and a
    view reading ``request.data.get(...)`` must not meet a bare number or list."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        if not isinstance(data, dict):
            raise ParseError("The request body must be a JSON object.")
        return data


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """Every error answers an object with a ``detail`` message. Services refuse with
    Django's ValidationError (400) or PermissionDenied (403), the artifact store with
    ArtifactError (400); a ValidationError raised for named fields, and DRF's own
    validation, also list each field's messages by name. Everything else is DRF's (its
    own errors, Http404)."""
    if isinstance(exc, ValidationError | ArtifactError | PermissionDenied):
        set_rollback()  # as DRF does for its own errors, should requests be atomic
    if isinstance(exc, ValidationError):
        body: dict = {"detail": " ".join(exc.messages)}
        if hasattr(exc, "error_dict"):
            body.update({field: messages for field, messages in exc.message_dict.items()})
        return Response(body, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ArtifactError):
        return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, PermissionDenied) and str(exc):
        return Response({"detail": str(exc)}, status=status.HTTP_403_FORBIDDEN)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, DRFValidationError):
        # DRF's validation names fields only ({"name": [...]}) or none (a bare list).
        if isinstance(response.data, dict) and "detail" not in response.data:
            response.data = {"detail": _summary(response.data), **response.data}
        elif isinstance(response.data, list):
            response.data = {"detail": _summary(response.data)}
    return response


def _summary(errors: dict | list, field: str = "") -> str:
    """DRF's validation errors as one message, each named by its field's path."""
    if isinstance(errors, dict):
        parts = [
            _summary(value, f"{field}.{name}" if field else str(name))
            for name, value in errors.items()
        ]
        return " ".join(part for part in parts if part)
    if isinstance(errors, list):
        return " ".join(part for part in (_summary(item, field) for item in errors) if part)
    named = field and field != api_settings.NON_FIELD_ERRORS_KEY
    return f"{field}: {errors}" if named else str(errors)


# --- the OpenAPI schema's error responses ------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "description": "An error: `detail` says what went wrong; a refused field's messages are "
    "also listed under its name (a nested field's, under an object of its fields).",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
    "additionalProperties": {
        "oneOf": [
            # A list's messages: strings, or (a list of objects) each item's fields.
            {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "object"}]}},
            {"type": "object"},
        ]
    },
}
ERROR_DESCRIPTIONS = {
    "400": "The request was refused: `detail` says why, and names the field at fault.",
    "401": "No valid API key or signed-in session (missing, malformed, unknown, revoked or "
    "expired: `detail` says which); or a body over 64 KiB from such a caller.",
    "403": "The caller's role, or the key's scopes, do not allow this call.",
    "404": "Nothing here, or nothing the caller may see.",
    "413": "The body is larger than this route's limit; refused before it is read.",
}


def error_responses(result: dict, generator, request, public: bool) -> dict:
    """drf-spectacular postprocessing hook: every REST operation documents the errors
    this module answers, with their shared body (the ``Error`` component).

    Each may answer 401 and 403; one with path parameters (or a page cursor) 404; one
    with a body or query parameters 400; one with a body 413. An operation declares any
    other error code itself (``OpenApiResponse(description=...)``), and an error response
    declared without a body gets the shared one.
    """
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = copy.deepcopy(
        ERROR_SCHEMA
    )
    for path, item in result.get("paths", {}).items():
        if not path.startswith("/api/v1/"):
            continue
        for operation in item.values():
            parameters = operation.get("parameters", [])
            codes = ["401", "403"]
            if any(p["in"] == "path" or p["name"] == "cursor" for p in parameters):
                codes.append("404")
            if "requestBody" in operation or any(p["in"] == "query" for p in parameters):
                codes.append("400")
            if "requestBody" in operation:
                codes.append("413")
            responses = operation.setdefault("responses", {})
            for code in codes:
                responses.setdefault(code, {"description": ERROR_DESCRIPTIONS[code]})
            for code, response in responses.items():
                if code.startswith(("4", "5")) and "content" not in response:
                    ref = {"$ref": "#/components/schemas/Error"}
                    response["content"] = {"application/json": {"schema": ref}}
            operation["responses"] = dict(sorted(responses.items()))
    return result
