"""Usage records: one row per inference request, written when the request ends."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from django.conf import settings

from apps.deployments.models import LoggingLevel
from apps.inference.gateway import Caller, Route
from apps.inference.models import UsageRecord


def usage_digest(value: Any) -> str:
    """The ``hashed`` logging level's digest of a prompt or output: HMAC-SHA256 keyed by
    ``USAGE_HASH_KEY``. Whoever holds the box's key can check whether a given text was
    sent; a copy of the database alone cannot test guesses against it, as it could an
    unkeyed sha256 of short or predictable prompts."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    key = settings.USAGE_HASH_KEY.encode("utf-8")
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def usage_record(
    *,
    caller: Caller,
    route: Route,
    request_id: str,
    endpoint: str,
    stream: bool,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    queue_ms: float | None,
    ttft_ms: float | None,
    latency_ms: float,
    outcome: str,
    status_code: int,
    error: str,
    prompt: Any,
    output: str,
) -> UsageRecord:
    """Record one request. Prompts and outputs are kept only as the deployment's logging
    level allows: not at all (metadata), as keyed digests (hashed), or in full."""
    record = UsageRecord(
        request_id=request_id,
        user=caller.user,
        username=caller.user.username,
        api_key=caller.api_key,
        api_key_prefix=caller.api_key.prefix if caller.api_key else "",
        deployment_id=route.deployment_id,
        deployment_name=route.deployment_name,
        model_sha256=route.sha256,
        adapter_sha256=route.adapter_sha256,
        revision=route.revision or None,
        worker=route.worker,
        endpoint=endpoint,
        stream=stream,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        completion_tokens=completion_tokens,
        queue_ms=queue_ms,
        load_ms=route.load_ms,
        time_to_first_token_ms=ttft_ms,
        latency_ms=latency_ms,
        outcome=outcome,
        status_code=status_code,
        error=error[:2000],
    )
    if route.logging_level == LoggingLevel.HASHED:
        record.prompt_sha256 = usage_digest(prompt)
        record.output_sha256 = usage_digest(output) if output else ""
    elif route.logging_level == LoggingLevel.FULL:
        record.prompt_text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        record.output_text = output
    record.save()
    return record
