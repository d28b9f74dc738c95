"""The REST API's (/api/v1/) shared conventions: what a request body may be, and how a
service's refusal becomes a response. Views call services and let these errors rise."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from rest_framework import status
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
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
    """Services refuse with Django's ValidationError (400) or PermissionDenied (403), the
    artifact store with ArtifactError (400): each answers ``{"detail": message}``, and
    a ValidationError raised for named fields also lists each field's messages, as DRF's
    own validation does. Everything else is DRF's (its own errors, Http404)."""
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
    return drf_exception_handler(exc, context)
