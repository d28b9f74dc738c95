"""Continuous batching through the whole stack: HTTP → Celery → one resident Gemma.

A deployment with several parallel slots decodes its requests together; each request
keeps its own prompt, sampling settings, seed, stop sequences and max_tokens, and gets
the same answer it gets alone.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.test import Client

from apps.deployments import selectors
from apps.deployments.models import Deployment
from apps.inference.models import Outcome, UsageRecord
from tests.serving.conftest import wait_until

PROMPTS = [
    "The history of the printing press begins",
    "Once upon a time",
    "def fibonacci(n):",
    "The capital of France is",
    "Water boils at",
    "My favourite colour is",
]


@pytest.fixture(scope="module")
def batched(stack):
    stack.deploy("gemma-batch", context_length=512, parallel_slots=4, queue_size=8)
    return stack


def _stream(stack, body: dict) -> dict:
    """Stream one completion; return its text, finish reason, usage and chunk times."""
    headers = {"Authorization": f"Bearer {stack.key()}"}
    text, times, finish, usage = [], [], None, None
    body = {
        **body,
        "model": "gemma-batch",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{stack.url}/v1/completions", headers=headers, json=body, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    text.append(choice["text"])
                    times.append(time.monotonic())
                finish = choice.get("finish_reason") or finish
    return {"text": "".join(text), "times": times, "finish": finish, "usage": usage}


def test_concurrent_requests_decode_together_with_their_own_settings(batched):
    requests = [
        {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0},
        {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0.9, "seed": 7},
        {"prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0},
        {"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 1.2, "top_p": 0.5, "seed": 3},
        {"prompt": PROMPTS[4], "max_tokens": 12, "temperature": 0},
        {"prompt": PROMPTS[5], "max_tokens": 30, "temperature": 0.7, "seed": 11},
    ]
    alone = [_stream(batched, body) for body in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda body: _stream(batched, body), requests))

    for body, solo, mixed in zip(requests, alone, together, strict=True):
        # A request's computation does not depend on its neighbours (batching.py): the
        # same text alone and batched, greedy or seeded.
        assert mixed["text"] == solo["text"], body
        assert mixed["usage"]["completion_tokens"] <= body["max_tokens"]
        assert mixed["finish"] in ("stop", "length")
        if mixed["finish"] == "length":
            assert mixed["usage"]["completion_tokens"] == body["max_tokens"]
    # Requests really were decoded at the same time: at some moment at least three
    # were streaming at once (served one by one, their streams would not overlap).
    spans = [(r["times"][0], r["times"][-1]) for r in together]
    overlap = max(sum(1 for a, b in spans if a <= t <= b) for t, _ in spans)
    assert overlap >= 3
    # Different prompts and settings: different answers, no cross-talk.
    assert len({r["text"] for r in together}) == len(requests)


def test_stop_sequences_apply_per_request_in_a_batch(batched):
    greedy = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
    whole = _stream(batched, greedy)["text"]
    stop = whole.split()[1]
    expected = whole[: whole.index(stop)]
    with ThreadPoolExecutor(3) as pool:
        stopped, other, unstopped = pool.map(
            lambda body: _stream(batched, body),
            [
                {**greedy, "stop": [stop]},
                {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0},
                greedy,
            ],
        )
    assert stopped["text"] == expected and stopped["finish"] == "stop"
    assert stop not in stopped["text"]
    assert unstopped["finish"] == "length" and len(unstopped["text"]) > len(expected)
    assert other["text"] and other["text"] != unstopped["text"]


def test_a_cancelled_request_frees_its_slot_for_the_next(stack):
    deployment = stack.deploy("gemma-pair", context_length=512, parallel_slots=2, queue_size=4)
    headers = {"Authorization": f"Bearer {stack.key()}"}
    long_body = {
        "model": "gemma-pair",
        "prompt": "A long story:",
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    started = [threading.Event(), threading.Event()]
    leave = threading.Event()
    finished_at: dict[str, float] = {}

    def long_stream(i: int) -> None:
        with httpx.stream(
            "POST", f"{stack.url}/v1/completions", headers=headers, json=long_body, timeout=120
        ) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n >= 2:
                    started[i].set()
                if i == 0 and leave.is_set():
                    return  # the client goes away mid-stream
        finished_at[f"long-{i}"] = time.monotonic()

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in started)
    # Both slots are busy: a third request waits in the queue...
    third: dict = {}
    waiting = threading.Thread(
        target=lambda: third.update(
            reply=httpx.post(
                f"{stack.url}/v1/completions",
                headers=headers,
                json={"model": "gemma-pair", "prompt": "Hi", "max_tokens": 4},
                timeout=120,
            ),
            at=time.monotonic(),
        )
    )
    waiting.start()

    def depth() -> int:
        worker = selectors.worker_get(stack.worker)
        return sum(r["queue_depth"] for r in worker.replicas if r["deployment"] == "gemma-pair")

    # Seen in the worker's heartbeat, not guessed from a sleep: two generating, one queued.
    wait_until(lambda: depth() == 3, what="two requests generating and a third waiting")
    assert "reply" not in third
    # ...until the first client disconnects: its slot goes to the third at once,
    # long before the other 400-token stream ends.
    leave.set()
    waiting.join(timeout=60)
    assert third["reply"].status_code == 200
    assert "long-1" not in finished_at
    threads[0].join(timeout=60)
    threads[1].join(timeout=120)
    assert finished_at["long-1"] > third["at"]
    replica = deployment.replica_set.get()

    def cancelled() -> dict | None:
        worker = selectors.worker_get(stack.worker)
        held = next(r for r in worker.replicas if r["replica_id"] == replica.pk)
        return held if held["cancelled"] >= 1 else None

    held = wait_until(cancelled, what="the worker counting the cancelled stream")
    assert held["slots"] == 2
    assert UsageRecord.objects.filter(
        deployment_name="gemma-pair", outcome=Outcome.CANCELLED
    ).exists()
    assert Deployment.objects.get(pk=deployment.pk).state == "ready"


def test_a_fastest_deployment_serves_and_its_page_says_which_mode(stack):
    """ "Fastest" mode (repacked weights, no pad rows) serves the same API; the replica
    reports the mode it loaded with and the deployment page names it."""
    deployment = stack.deploy(
        "gemma-fastest", context_length=512, parallel_slots=2, serving_mode="fastest"
    )
    headers = {"Authorization": f"Bearer {stack.key()}"}
    replies = [
        httpx.post(
            f"{stack.url}/v1/completions",
            headers=headers,
            json={"model": "gemma-fastest", "prompt": prompt, "max_tokens": 12, "temperature": 0},
            timeout=120,
        )
        for prompt in PROMPTS[:2]
    ]
    for reply in replies:
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["text"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 12
    worker = selectors.worker_get(stack.worker)
    held = [r for r in worker.replicas if r["deployment"] == "gemma-fastest"]
    assert [r["serving_mode"] for r in held] == ["fastest"]

    browser = Client()
    browser.force_login(stack.admin)
    page = browser.get(f"/deployments/{deployment.name}/").content.decode()
    assert 'data-serving-mode="fastest"' in page
    assert "Fastest (repacked weights" in page
    page = browser.get("/deployments/gemma/").content.decode()
    assert 'data-serving-mode="identical"' in page
