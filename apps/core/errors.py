"""Error pages: HTML for people, JSON for API callers, never a traceback."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith("/api/") or request.path.startswith("/v1/")


def _error(request: HttpRequest, status: int, title: str, message: str) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({"detail": message}, status=status)
    context = {"title": title, "message": message}
    return render(request, "error.html", context, status=status)


def forbidden(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = str(exception) if exception and str(exception) else "You may not do this."
    return _error(request, 403, "Not allowed", message)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _error(request, 404, "Not found", "There is nothing here, or you may not see it.")


def server_error(request: HttpRequest) -> HttpResponse:
    return _error(request, 500, "Something went wrong", "The error has been logged.")
