"""The OpenAI-compatible endpoint (/v1/...) and the playground's streaming chat.

Async views: a streamed answer holds no thread while it waits for tokens, and Django
cancels the view when the client disconnects, which cancels the generation too. A
request's life is in ``exchange.py``, its answer's shape in ``responses.py``.
"""

from __future__ import annotations

import functools
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from apps.deployments.models import Deployment, State
from apps.inference import gateway
from apps.inference.exchange import Authorize, bearer, session_caller
from apps.inference.openai_api import ApiError
from apps.inference.responses import embedding_response, generation_response


def _api(handler):
    """Bearer-authenticated /v1 view; errors in OpenAI's shape."""

    async def view(request: HttpRequest, **kwargs: Any) -> HttpResponse:
        try:
            authorize = bearer(request)
        except ApiError as exc:
            return exc.response()
        return await handler(request, authorize, **kwargs)

    view.body_limit = "inference"  # aibox/limits.py: the inference API's body limit
    return csrf_exempt(view)


@require_POST
@_api
async def chat_completions(request: HttpRequest, authorize: Authorize) -> HttpResponse:
    return await generation_response(request, authorize, "chat")


@require_POST
@_api
async def completions(request: HttpRequest, authorize: Authorize) -> HttpResponse:
    return await generation_response(request, authorize, "completion")


@require_POST
@_api
async def embeddings(request: HttpRequest, authorize: Authorize) -> HttpResponse:
    return await embedding_response(request, authorize)


def _model_object(deployment: Deployment) -> dict[str, Any]:
    return {
        "id": deployment.name,
        "object": "model",
        "created": int(deployment.created_at.timestamp()),
        "owned_by": "aibox",
        "ready": deployment.state == State.READY,
    }


def _visible_models(authorize: Authorize) -> list[dict[str, Any]]:
    caller = authorize()
    gateway.check_inference_access(caller)
    return [
        _model_object(d)
        for d in Deployment.objects.visible_to(caller.user).filter(running=True)
        if gateway.may_use(caller, d.name)
    ]


@require_GET
@_api
async def models(request: HttpRequest, authorize: Authorize) -> HttpResponse:
    try:
        data = await sync_to_async(_visible_models)(authorize)
    except ApiError as exc:
        return exc.response()
    return JsonResponse({"object": "list", "data": data})


@require_GET
@_api
async def model_detail(request: HttpRequest, authorize: Authorize, name: str) -> HttpResponse:
    try:
        data = await sync_to_async(_visible_models)(authorize)
    except ApiError as exc:
        return exc.response()
    match = next((m for m in data if m["id"] == name), None)
    if match is None:
        return gateway.not_found(name).response()
    return JsonResponse(match)


@require_POST
async def playground_chat(request: HttpRequest) -> HttpResponse:
    """The playground's chat: the signed-in user's session (and CSRF token), no API key."""
    return await generation_response(request, functools.partial(session_caller, request), "chat")


playground_chat.body_limit = "inference"  # aibox/limits.py
