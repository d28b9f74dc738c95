"""Soak run: streaming clients for a long time beside uploads and dataset jobs, against a
running AIBox (``bin/aibox run``), and what it leaves behind.

- N streaming clients (default 8) loop over chat completions for --minutes (default 30);
  a request counts as an error if it is not a 200 or its stream does not end in [DONE];
- every --upload-every seconds a small JSON Lines dataset version is uploaded through the
  REST API, and its validation job (on a worker) must end valid;
- at the end: errors (target 0), usage records against requests sent (target equal: the
  ledger lost nothing), datasets validated against uploaded, and the resident memory of
  the web server and the serving worker sampled over time (target: flat after warm-up),
  from /proc by their command lines.

It writes its own data scientist and API key into AIBox's database (Django settings from
the environment and .env, as bin/aibox run uses them).

    .venv/bin/python bench/soak.py
    .venv/bin/python bench/soak.py --minutes 10 --clients 8 --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ["Tell me about rivers.", "Describe a city at night.", "What is a server?"]


def setup_django():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
    import django

    django.setup()
    # One line per request from httpx would bury the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def make_identity() -> tuple[str, str, str]:
    """A data scientist of this run with a key for inference and datasets; its dataset."""
    from apps.accounts.models import Role, Scope, User
    from apps.accounts.services import api_key_create
    from apps.datasets.services import dataset_create

    tag = uuid.uuid4().hex[:6]
    user = User.objects.create_user(username=f"soak-{tag}", role=Role.DATA_SCIENTIST)
    issued = api_key_create(
        actor=user, owner=user, name="soak", scopes=[Scope.INFERENCE, Scope.DATASETS]
    )
    dataset = dataset_create(actor=user, name=f"soak-{tag}", licence="cc0-1.0")
    return issued.secret, issued.api_key.prefix, dataset.name


def rss_mb(pattern: str) -> float | None:
    """Resident memory of the process of this checkout (``bin/aibox run`` starts them in
    it) whose command line contains ``pattern``: not a test's web server or worker."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if (
                pattern in command
                and "soak.py" not in command
                and (entry / "cwd").resolve() == ROOT
            ):
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.errors = self.tokens = 0
        self.uploads = self.validated = self.upload_errors = 0
        self.reasons: dict[str, int] = {}

    def error(self, reason: str) -> None:
        with self.lock:
            self.errors += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1


def stream_client(url: str, key: str, model: str, deadline: float, tally: Tally, i: int):
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
            "max_tokens": 48,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with tally.lock:
            tally.sent += 1
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    tally.error(f"HTTP {response.status_code}")
                    continue
                done = False
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            tally.error(event["error"].get("code", "error event"))
                        elif event.get("usage"):
                            with tally.lock:
                                tally.tokens += event["usage"]["completion_tokens"]
                if not done:
                    tally.error("stream without [DONE]")
        except httpx.HTTPError as exc:
            tally.error(type(exc).__name__)
    client.close()


def uploader(url: str, key: str, dataset: str, every: float, deadline: float, tally: Tally):
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    while time.monotonic() < deadline:
        rows = "".join(
            json.dumps({"prompt": f"Question {i} at {time.time()}?", "completion": "An answer."})
            + "\n"
            for i in range(200)
        )
        with tally.lock:
            tally.uploads += 1
        response = client.post(
            f"/api/v1/datasets/{dataset}/versions/",
            files={"file": ("rows.jsonl", rows.encode(), "application/jsonl")},
        )
        if response.status_code != 201:
            with tally.lock:
                tally.upload_errors += 1
        else:
            version = response.json()["id"]
            for _ in range(120):
                state = client.get(f"/api/v1/dataset-versions/{version}/").json()["state"]
                if state != "validating":
                    break
                time.sleep(1)
            with tally.lock:
                if state == "valid":
                    tally.validated += 1
                else:
                    tally.upload_errors += 1
        time.sleep(max(0.0, every - 1))
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--upload-every", type=float, default=60)
    parser.add_argument("--sample-every", type=float, default=30)
    args = parser.parse_args()

    setup_django()
    from django.utils import timezone

    from apps.inference.models import UsageRecord

    key, prefix, dataset = make_identity()
    started_at = timezone.now()
    deadline = time.monotonic() + args.minutes * 60
    tally = Tally()
    threads = [
        threading.Thread(target=stream_client, args=(args.url, key, args.model, deadline, tally, i))
        for i in range(args.clients)
    ]
    threads.append(
        threading.Thread(
            target=uploader, args=(args.url, key, dataset, args.upload_every, deadline, tally)
        )
    )
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float | None, float | None]] = []
    begin = time.monotonic()
    while any(t.is_alive() for t in threads):
        elapsed = time.monotonic() - begin
        web, worker = rss_mb("uvicorn aibox.asgi"), rss_mb("--hostname cpu@")
        samples.append((elapsed, web, worker))
        print(
            f"{elapsed / 60:5.1f} min  requests {tally.sent:5d}  errors {tally.errors}  "
            f"uploads {tally.uploads} (valid {tally.validated})  "
            f"web {web or 0:6.0f} MB  worker {worker or 0:6.0f} MB",
            flush=True,
        )
        time.sleep(args.sample_every)
    for thread in threads:
        thread.join()
    time.sleep(3)  # the last records are written as their streams close
    recorded = UsageRecord.objects.filter(api_key_prefix=prefix, created_at__gte=started_at).count()

    print(f"\nSoak: {args.clients} streaming clients for {args.minutes:g} min, {args.url}")
    print(f"requests sent       {tally.sent}")
    print(f"errors              {tally.errors} (target 0) {tally.reasons or ''}")
    ratio = recorded / max(1, tally.sent)
    print(f"usage records       {recorded} (target {tally.sent}: ratio {ratio:.4f})")
    print(f"tokens streamed     {tally.tokens} ({tally.tokens / (args.minutes * 60):.1f} tokens/s)")
    print(
        f"dataset uploads     {tally.uploads}, validated {tally.validated}, "
        f"failed {tally.upload_errors}"
    )
    warm = [s for s in samples if s[0] >= min(120, samples[-1][0] / 4)] or samples
    for label, index in (("web", 1), ("worker", 2)):
        values = [s[index] for s in warm if s[index] is not None]
        if values:
            print(
                f"RSS {label:7s} after warm-up: first {values[0]:.0f} MB, "
                f"last {values[-1]:.0f} MB, "
                f"max {max(values):.0f} MB, median {statistics.median(values):.0f} MB "
                f"(last/first {values[-1] / values[0]:.3f})"
            )


if __name__ == "__main__":
    main()
