"""The OpenAI-compatible endpoint, driven with OpenAI's own client against the live stack."""

from __future__ import annotations

import hashlib
import json
import re
import threading

import httpx
import openai
import pytest
import redis
from django.conf import settings

from apps.deployments import selectors
from apps.deployments.models import Deployment
from apps.inference.models import Outcome, UsageRecord
from apps.inference.services import usage_digest
from tests.serving.conftest import wait_until
from workers import redis_keys

HELLO = [{"role": "user", "content": "Name three colours."}]


def test_model_list_shows_the_deployment(openai_client):
    ids = [model.id for model in openai_client.models.list()]
    assert "gemma" in ids
    assert openai_client.models.retrieve("gemma").id == "gemma"


def test_chat_completion_answers_and_is_recorded(openai_client, stack):
    reply = openai_client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.model == "gemma"

    record = UsageRecord.objects.get(request_id=reply.id.removeprefix("chatcmpl-"))
    assert record.outcome == Outcome.OK
    assert record.model_sha256 == stack.version.sha256
    assert record.username == "serve-dev" and record.api_key_prefix
    assert (record.prompt_tokens, record.completion_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert record.latency_ms > 0 and record.time_to_first_token_ms > 0
    # The deployment logs "hashed": digests, never the text.
    assert record.prompt_text == "" and record.output_text == ""
    # Keyed digests: the box's key matches them to a text; a plain sha256 of it does not.
    assert record.prompt_sha256 == usage_digest(HELLO)
    assert record.output_sha256 == usage_digest(reply.choices[0].message.content)
    plain = hashlib.sha256(json.dumps(HELLO, ensure_ascii=False).encode()).hexdigest()
    assert record.prompt_sha256 != plain


def test_streamed_chat_matches_the_whole_answer_under_greedy_decoding(openai_client):
    args = {"model": "gemma", "messages": HELLO, "max_tokens": 16, "temperature": 0}
    whole = openai_client.chat.completions.create(**args).choices[0].message.content
    chunks = list(
        openai_client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_stream_interval_groups_tokens_but_sends_the_first_at_once(stack, openai_client):
    """A deployment's stream interval: fewer, larger chunks, the same text and usage."""
    # As "gemma" is deployed, so that greedy answers match token for token.
    stack.deploy("gemma-chunky", context_length=512, preset="precise", stream_interval_ms=1000)
    args = {"prompt": "The history of the printing press", "temperature": 0}
    whole = openai_client.completions.create(model="gemma", max_tokens=24, **args)
    first = openai_client.completions.create(model="gemma", max_tokens=1, **args)
    chunks = list(
        openai_client.completions.create(
            model="gemma-chunky",
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **args,
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    # The first token is not held back for the interval: it is a chunk of its own.
    assert texts[0] == first.choices[0].text
    # The other 23 tokens come in a few chunks (one per second of generation at most).
    assert len(texts) < 8


def test_worker_log_has_no_line_per_request(stack, openai_client):
    """Each request has its usage record; the worker's log keeps its lifecycle lines."""
    reply = openai_client.completions.create(model="gemma", prompt="Hi", max_tokens=1)
    wait_until(
        lambda: UsageRecord.objects.filter(request_id=reply.id.removeprefix("cmpl-")).exists(),
        what="the request's usage record",
    )
    log = (stack.logs / f"{stack.worker.split('@')[0]}.log").read_text()
    assert re.search(r"Task deployments\.replica_load\[[^]]+\] succeeded", log)
    assert "inference.submit[" not in log


def test_every_stream_is_on_record_when_the_client_closes_at_done(stack, openai_client):
    """The openai package closes a stream as soon as it reads [DONE]; the record stays.

    More requests than the web process's database pool holds connections (20): a record
    written after its request must still hand its connection back.
    """
    request_ids = []
    with httpx.Client(timeout=60) as client:
        for _ in range(24):
            with client.stream(
                "POST",
                f"{stack.url}/v1/completions",
                headers={"Authorization": f"Bearer {stack.key()}"},
                json={"model": "gemma", "prompt": "Hello", "max_tokens": 1, "stream": True},
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        request_id = json.loads(line[6:])["id"].removeprefix("cmpl-")
                    if line == "data: [DONE]":
                        break  # and close the connection at once
            request_ids.append(request_id)
    for _ in range(4):
        stream = openai_client.completions.create(
            model="gemma", prompt="Hello", max_tokens=1, stream=True
        )
        request_ids.append(next(iter(stream)).id.removeprefix("cmpl-"))
        list(stream)

    def recorded():
        rows = UsageRecord.objects.filter(request_id__in=request_ids)
        return rows if rows.count() == len(request_ids) else None

    rows = wait_until(recorded, what="a usage record for each of 28 streams", timeout=10)
    assert {(r.outcome, r.status_code, r.completion_tokens) for r in rows} == {(Outcome.OK, 200, 1)}


def test_stream_ends_with_done_marker(stack):
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/completions",
        headers={"Authorization": f"Bearer {stack.key()}"},
        json={"model": "gemma", "prompt": "One, two,", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completion_with_and_without_streaming(openai_client):
    whole = openai_client.completions.create(
        model="gemma", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert whole.choices[0].text.strip()
    assert whole.usage.completion_tokens <= 8
    streamed = openai_client.completions.create(
        model="gemma", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_sequence_and_seed(openai_client):
    counted = openai_client.completions.create(
        model="gemma", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=["7"]
    )
    assert "7" not in counted.choices[0].text
    assert counted.choices[0].finish_reason == "stop"
    runs = [
        openai_client.completions.create(
            model="gemma", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_bad_key_is_401(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.url}/v1", api_key="aibox_nope_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"


def test_key_without_inference_scope_is_403(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key("registry-only"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="gemma", messages=HELLO, max_tokens=4)
    assert "inference" in caught.value.message


def test_compliance_officer_cannot_call_inference(stack):
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.key('compliance')}"},
        json={"model": "gemma", "messages": HELLO},
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found"


def test_over_long_prompt_is_400_saying_so(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "word " * 2000}], max_tokens=4
        )
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in caught.value.message


def test_malformed_requests_are_400_with_the_parameter(stack):
    headers = {"Authorization": f"Bearer {stack.key()}"}
    cases = [
        ({"model": "gemma"}, "messages"),
        ({"model": "gemma", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "gemma", "messages": HELLO, "temperature": 9}, "temperature"),
        ({"model": "gemma", "messages": HELLO, "n": 3}, "n"),
    ]
    for body, param in cases:
        response = httpx.post(f"{stack.url}/v1/chat/completions", headers=headers, json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == param
    response = httpx.post(f"{stack.url}/v1/chat/completions", headers=headers, content=b"{not json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_full_queue_is_429_with_retry_after(stack):
    deployment = stack.deploy("gemma-narrow", context_length=512, queue_size=1)
    headers = {"Authorization": f"Bearer {stack.key()}"}
    body = {
        "model": "gemma-narrow",
        "prompt": "Count slowly:",
        "max_tokens": 120,
        "temperature": 0,
        "stream": True,
    }
    generating = threading.Event()
    statuses: list[int] = []

    def hold() -> None:
        with httpx.stream(
            "POST", f"{stack.url}/v1/completions", headers=headers, json=body, timeout=60
        ) as response:
            statuses.append(response.status_code)
            for _ in response.iter_lines():
                generating.set()

    # One request generating and one queued behind it fill this deployment.
    threads = [threading.Thread(target=hold) for _ in range(2)]
    threads[0].start()
    assert generating.wait(30)
    threads[1].start()
    admitted = redis.Redis.from_url(settings.REDIS_URL)
    wait_until(
        lambda: admitted.zcard(redis_keys.admission_key(deployment.pk)) >= 2,
        what="the second request being admitted",
    )
    try:
        response = httpx.post(f"{stack.url}/v1/completions", headers=headers, json=body)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"
        assert response.json()["error"]["code"] == "queue_full"
    finally:
        for thread in threads:
            thread.join(timeout=60)
    assert statuses == [200, 200]
    # The refusal is on record too.
    assert UsageRecord.objects.filter(
        deployment_name="gemma-narrow", outcome=Outcome.REJECTED, status_code=429
    ).exists()


def test_client_disconnect_stops_generation(stack):
    headers = {"Authorization": f"Bearer {stack.key()}"}
    body = {"model": "gemma", "prompt": "A long story:", "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST", f"{stack.url}/v1/completions", headers=headers, json=body, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    # The endpoint records the request as cancelled...
    record = wait_until(
        lambda: UsageRecord.objects.filter(outcome=Outcome.CANCELLED).first(),
        what="the disconnect being recorded",
    )
    assert record.status_code == 499
    # ...and the worker stopped generating long before the 400 tokens asked for.
    gemma = Deployment.objects.get(name="gemma").replica_set.get()

    def held() -> dict | None:
        worker = selectors.worker_get(stack.worker)
        replica = next(r for r in worker.replicas if r["replica_id"] == gemma.pk)
        return replica if replica["cancelled"] >= 1 and not replica["queue_depth"] else None

    replica = wait_until(held, what="the worker reporting the cancelled generation")
    assert replica["cancelled_at_tokens"] < 100
    # The replica is free: a following request is answered.
    reply = httpx.post(
        f"{stack.url}/v1/completions",
        headers=headers,
        json={"model": "gemma", "prompt": "Hi", "max_tokens": 2},
        timeout=30,
    )
    assert reply.status_code == 200


def test_embeddings_for_a_deployment_that_serves_them(stack, openai_client):
    stack.deploy("gemma-embed", context_length=256, embeddings=True)
    # The openai client asks for base64 by default and decodes it.
    result = openai_client.embeddings.create(model="gemma-embed", input=["red", "a blue sky"])
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [640, 640]  # Gemma 3 270M's embedding size
    assert vectors[0] != vectors[1]
    assert result.usage.prompt_tokens > 0
    floats = httpx.post(
        f"{stack.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {stack.key()}"},
        json={"model": "gemma-embed", "input": "red", "encoding_format": "float"},
        timeout=30,
    ).json()
    assert floats["data"][0]["embedding"] == pytest.approx(vectors[0], rel=1e-5)
    # A deployment without embeddings says so.
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.embeddings.create(model="gemma", input="red")
    assert "does not serve embeddings" in caught.value.message


def test_readme_examples_work_as_printed(stack, tmp_path, monkeypatch):
    """The README's curl and openai calls, pointed at this stack's port and key file."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    stack.deploy("gemma-3-270m", context_length=512)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "api-key.txt").write_text(stack.key() + "\n")
    monkeypatch.chdir(tmp_path)

    def localise(text: str) -> str:
        return text.replace("http://127.0.0.1:8000", stack.url)

    curl = re.search(r"```sh\n(curl .*?)```", readme, re.S).group(1)
    done = subprocess.run(
        ["bash", "-c", localise(curl)], capture_output=True, text=True, timeout=60
    )
    reply = json.loads(done.stdout)
    assert reply["choices"][0]["message"]["content"].strip(), done.stderr

    python = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    done = subprocess.run(
        [sys.executable, "-c", localise(python)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
