"""Retention: old usage records go, stored prompts go sooner, audit events never."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings as django_settings

from aibox.celery import app as celery_app
from apps.accounts.services import api_key_create, system_user
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_chain_verify
from apps.inference.models import Outcome, UsageRecord
from apps.ops.models import UsageCarry
from apps.ops.services import usage_prune
from tests.inference.factories import make_usage
from tests.live import wait_until

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


@pytest.fixture
def retention(settings):
    settings.USAGE_RETENTION_DAYS = 10
    settings.PROMPT_RETENTION_DAYS = 3


@pytest.mark.django_db
def test_prune_removes_only_what_is_past_its_cutoff(users, retention):
    expired = make_usage(at=days_ago(10.01), prompt_text="old secret", output_text="old answer")
    kept_blanked = make_usage(
        at=days_ago(9), prompt_text="a prompt", output_text="an answer", prompt_sha256="a" * 64
    )
    kept_hashed = make_usage(at=days_ago(9), prompt_sha256="b" * 64, output_sha256="c" * 64)
    fresh = make_usage(at=days_ago(2.9), prompt_text="recent prompt", output_text="recent")
    for user in users.values():
        api_key_create(actor=user, owner=user, name="k", scopes=["registry:read"])
    audit_before = list(AuditEvent.objects.order_by("seq").values_list("seq", "hash"))
    assert len(audit_before) == 4

    result = usage_prune(actor=system_user(), now=NOW)

    assert (result.records_deleted, result.prompts_cleared) == (1, 1)
    assert not UsageRecord.objects.filter(pk=expired.pk).exists()
    kept_blanked.refresh_from_db()
    assert (kept_blanked.prompt_text, kept_blanked.output_text) == ("", "")
    # Digests stay with their record: they reveal nothing and still match a prompt.
    assert kept_blanked.prompt_sha256 == "a" * 64
    kept_hashed.refresh_from_db()
    assert (kept_hashed.prompt_sha256, kept_hashed.output_sha256) == ("b" * 64, "c" * 64)
    fresh.refresh_from_db()
    assert (fresh.prompt_text, fresh.output_text) == ("recent prompt", "recent")

    # Every earlier audit event is still there, unchanged, and the chain verifies.
    events = list(AuditEvent.objects.order_by("seq").values_list("seq", "hash"))
    assert events[: len(audit_before)] == audit_before
    assert len(events) == len(audit_before) + 1
    assert audit_chain_verify().ok
    event = AuditEvent.objects.get(action="usage.prune")
    assert event.actor_label == "system" and event.outcome == "success"
    assert event.details["records_deleted"] == 1
    assert event.details["prompts_cleared"] == 1
    assert event.details["usage_cutoff"] == days_ago(10).isoformat()
    assert event.details["prompt_cutoff"] == days_ago(3).isoformat()


@pytest.mark.django_db
def test_prune_works_in_batches_and_carries_the_totals(users, retention):
    for i in range(7):
        make_usage(
            at=days_ago(20 + i),
            deployment="chat",
            worker="cpu@box",
            outcome=Outcome.OK if i % 3 else Outcome.ERROR,
            latency_ms=200.0 * (i + 1),
            prompt_tokens=i,
            completion_tokens=2 * i,
        )
    make_usage(at=days_ago(1), deployment="chat")

    result = usage_prune(actor=system_user(), now=NOW, batch_size=3)

    assert result.records_deleted == 7
    assert result.batches == 3  # 3 + 3 + 1 rows, each batch its own transaction
    assert UsageRecord.objects.count() == 1
    carried = {c.outcome: c for c in UsageCarry.objects.filter(deployment_name="chat")}
    assert set(carried) == {Outcome.OK, Outcome.ERROR}
    ok, error = carried[Outcome.OK], carried[Outcome.ERROR]
    assert (ok.requests, error.requests) == (4, 3)  # i = 1, 2, 4, 5 and i = 0, 3, 6
    assert ok.prompt_tokens + error.prompt_tokens == sum(range(7))
    assert ok.completion_tokens + error.completion_tokens == 2 * sum(range(7))
    assert ok.latency_sum_ms + error.latency_sum_ms == pytest.approx(200.0 * 28)
    # Latencies 200..1400 ms: at or under 0.5 s, i = 0, 1 (one error, one ok).
    bucket_05 = 3  # index of 0.5 s in LATENCY_BUCKETS_SECONDS
    assert (ok.latency_buckets[bucket_05], error.latency_buckets[bucket_05]) == (1, 1)

    again = usage_prune(actor=system_user(), now=NOW, batch_size=3)
    assert (again.records_deleted, again.prompts_cleared, again.batches) == (0, 0, 0)
    assert AuditEvent.objects.filter(action="usage.prune").count() == 2


def test_beat_schedule_names_registered_tasks():
    celery_app.loader.import_default_modules()
    schedule = django_settings.CELERY_BEAT_SCHEDULE
    assert isinstance(schedule, dict) and "usage-prune" in schedule
    for name, entry in schedule.items():
        assert entry["task"] in celery_app.tasks, f"{name}: no task {entry['task']!r}"
    assert django_settings.CELERY_BEAT_SCHEDULE_FILENAME.startswith(
        str(django_settings.BASE_DIR / "var")
    )


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_task_prunes_on_a_real_worker(live_worker):
    # The worker runs with the default settings: 90 days for records, 30 for prompts.
    now = datetime.now(UTC)
    expired = make_usage(at=now - timedelta(days=91))
    blanked = make_usage(at=now - timedelta(days=31), prompt_text="p", output_text="o")
    kept = make_usage(at=now - timedelta(days=29), prompt_text="p", output_text="o")
    entry = django_settings.CELERY_BEAT_SCHEDULE["usage-prune"]

    # What beat sends when the entry is due.
    celery_app.send_task(entry["task"], args=entry.get("args", ()), kwargs=entry.get("kwargs"))

    event = wait_until(
        lambda: AuditEvent.objects.filter(action="usage.prune").first(),
        what="the prune's audit event",
    )
    assert event.actor_label == "system"
    assert (event.details["records_deleted"], event.details["prompts_cleared"]) == (1, 1)
    assert not UsageRecord.objects.filter(pk=expired.pk).exists()
    blanked.refresh_from_db()
    assert blanked.prompt_text == "" and blanked.output_text == ""
    kept.refresh_from_db()
    assert kept.prompt_text == "p"
    assert UsageCarry.objects.get(deployment_name="chat").requests == 1


def test_settings_refuse_a_retention_below_one_day():
    result = subprocess.run(
        [sys.executable, "-c", "import aibox.settings"],
        env={"AIBOX_DEBUG": "true", "AIBOX_USAGE_RETENTION_DAYS": "0", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        cwd=django_settings.BASE_DIR,
    )
    assert result.returncode != 0
    assert "AIBOX_USAGE_RETENTION_DAYS" in result.stderr
