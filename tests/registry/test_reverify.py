"""Periodic re-verification through a real Celery worker: a stored file corrupted on disk
is found, marked, audited and refused on deploy; once restored it is served again."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.accounts.models import SYSTEM_USERNAME, Role
from apps.audit.models import AuditEvent
from apps.deployments.services import deployment_create
from apps.registry import tasks
from apps.registry.artifacts import artifact_store
from apps.registry.models import Artifact
from apps.registry.services import model_repo_create, model_version_approve
from tests.conftest import client_for
from tests.live import wait_until
from tests.registry.conftest import upload_version, write_tiny_gguf

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def artifact_root(settings, live_worker):
    # The worker reads the same store as the test.
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    return live_worker.artifact_root


def _verified_at(version):
    return Artifact.objects.get(pk=version.sha256).last_verified_at


def test_a_corrupted_file_is_found_marked_audited_and_refused_until_restored(users, tmp_path):
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name=f"reverify-{tmp_path.name[-8:]}", licence="mit")
    corrupted = upload_version(admin, repo, write_tiny_gguf(tmp_path / "a.gguf", seed=11))
    model_version_approve(actor=admin, version=corrupted, reason="test")
    older = upload_version(admin, repo, write_tiny_gguf(tmp_path / "b.gguf", seed=12))
    recent = upload_version(admin, repo, write_tiny_gguf(tmp_path / "c.gguf", seed=13))
    now = timezone.now()
    Artifact.objects.filter(pk=older.sha256).update(last_verified_at=now - timedelta(days=3))
    Artifact.objects.filter(pk=recent.sha256).update(last_verified_at=now - timedelta(days=1))

    path = artifact_store().path_for(corrupted.sha256)
    original = path.read_bytes()
    os.chmod(path, 0o644)
    path.write_bytes(original[:-4] + b"\0\0\0\0")  # same size, different content

    # One bounded run: the never-verified file and the oldest one, not the recent one.
    tasks.artifact_reverify.delay(2)
    wait_until(
        lambda: _verified_at(corrupted) is not None and _verified_at(older) > now,
        what="the re-verification run checked two files",
    )
    assert _verified_at(recent) == now - timedelta(days=1)
    failed = Artifact.objects.get(pk=corrupted.sha256)
    assert failed.integrity_failed_at is not None
    assert "has changed on disk" in failed.integrity_failure
    assert Artifact.objects.get(pk=older.sha256).integrity_failed_at is None

    event = AuditEvent.objects.get(action="artifact.integrity_failure")
    assert event.outcome == "failure"
    assert event.target_id == corrupted.sha256
    assert event.details["versions"] == [str(corrupted)]
    assert event.actor_label == SYSTEM_USERNAME

    with pytest.raises(ValidationError) as refused:
        deployment_create(actor=admin, name="corrupt-chat", model_version=corrupted)
    assert "its stored file failed verification" in refused.value.messages[0]
    page = client_for(admin).get(f"/registry/versions/{corrupted.pk}/").content.decode()
    assert "The stored file failed verification" in page

    # A later run finds it still broken but says so only once.
    checked_before = _verified_at(corrupted)
    tasks.artifact_reverify.delay(settings.ARTIFACT_REVERIFY_BATCH)
    wait_until(lambda: _verified_at(corrupted) > checked_before, what="a second run")
    assert AuditEvent.objects.filter(action="artifact.integrity_failure").count() == 1

    # Restored from backup: the next run clears the mark and it deploys again.
    path.write_bytes(original)
    tasks.artifact_reverify.delay(settings.ARTIFACT_REVERIFY_BATCH)
    wait_until(
        lambda: Artifact.objects.get(pk=corrupted.sha256).integrity_failed_at is None,
        what="the restored file verified",
    )
    restored = AuditEvent.objects.get(action="artifact.integrity_restored")
    assert restored.target_id == corrupted.sha256
    assert deployment_create(actor=admin, name="corrupt-chat", model_version=corrupted).pk


def test_the_task_is_on_the_beat_schedule():
    entry = next(
        e
        for e in settings.CELERY_BEAT_SCHEDULE.values()
        if e["task"] == tasks.artifact_reverify.name
    )
    assert entry["schedule"] == settings.ARTIFACT_REVERIFY_EVERY


def test_staged_files_left_by_a_crash_are_pruned_by_the_worker(users, tmp_path):
    store = artifact_store()
    store.tmp.mkdir(parents=True, exist_ok=True)
    stale, live = store.tmp / "incoming-crashed", store.tmp / "incoming-receiving"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y" * 10)
    two_days_ago = timezone.now().timestamp() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))

    tasks.artifact_staging_prune.delay()
    wait_until(lambda: not stale.exists(), what="the crashed upload's file being removed")
    assert live.exists()  # an upload still being written is left alone
    event = AuditEvent.objects.get(action="artifact.staging_prune")
    assert event.actor_label == SYSTEM_USERNAME
    assert event.details["files"] == 1 and event.details["bytes"] == 1000
    live.unlink()


def test_the_staging_prune_is_on_the_beat_schedule():
    tasks_scheduled = {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}
    assert tasks.artifact_staging_prune.name in tasks_scheduled
