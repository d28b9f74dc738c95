"""Refuse request bodies over the upload limit before Django buffers them.

Django's ASGI handler reads the whole body (to a temporary file) before any view
runs, so the upload handlers' own limit would come only after the disk had filled.
This wrapper answers 413 as soon as the declared or received size crosses the limit.
"""

from __future__ import annotations

import json

from django.conf import settings

# Multipart framing and form fields around the file itself.
_OVERHEAD = 1024 * 1024


class BodySizeLimit:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = settings.UPLOAD_MAX_BYTES + _OVERHEAD
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps(
            {"detail": f"Request body larger than the upload limit ({limit - _OVERHEAD:,} bytes)."}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass
