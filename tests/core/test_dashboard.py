"""The operations dashboard: admins' home page, figures computed by PostgreSQL from the
usage records, charts and live fragments; other roles keep their own home page."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from apps.accounts.models import Role
from apps.datasets.services import dataset_create, dataset_version_ingest
from apps.finetune.models import FineTuneJob, JobState
from apps.inference.models import Outcome
from apps.ops import selectors
from apps.registry.artifacts import artifact_store
from apps.registry.models import SourceKind
from apps.registry.services import model_repo_create, model_version_ingest
from tests.conftest import client_for
from tests.inference.factories import make_usage
from tests.registry.conftest import write_tiny_gguf
from workers import redis_keys
from workers.inference.runtime import heartbeat_payload

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 1, 12, 30, 30, tzinfo=UTC)
# Ten requests, 100 ms to 1000 ms: 7 answered, a client's bad request, a timeout, an
# error. percentile_cont interpolates: p50 = 550, p95 = 100 + 0.95 * 9 * 100 = 955.
OUTCOMES = [Outcome.OK] * 7 + [Outcome.CLIENT_ERROR, Outcome.TIMEOUT, Outcome.ERROR]


def traffic(base: datetime) -> None:
    for i, outcome in enumerate(OUTCOMES):
        # The first six in one minute, the other four in the next.
        at = base + timedelta(minutes=0 if i < 6 else 1, seconds=i)
        make_usage(
            at=at,
            outcome=outcome,
            latency_ms=100.0 * (i + 1),
            prompt_tokens=5,
            completion_tokens=12,
        )


def test_figures_match_the_usage_records():
    traffic(NOW - timedelta(minutes=10, seconds=30))  # 12:20:00 and 12:21:00
    make_usage(at=NOW - timedelta(minutes=61), latency_ms=99_999)  # before the window
    window = selectors.traffic_window(NOW)
    assert window.start == datetime(2026, 6, 1, 11, 31, tzinfo=UTC)
    assert window.seconds == 59 * 60 + 30

    summary = selectors.traffic_summary(window)
    assert summary["requests"] == 10
    assert summary["p50_ms"] == pytest.approx(550.0)
    assert summary["p95_ms"] == pytest.approx(955.0)
    assert summary["error_rate"] == pytest.approx(0.2)  # the client's 400 is not a failure
    assert summary["rps"] == pytest.approx(10 / 3570)
    assert summary["completion_tps"] == pytest.approx(120 / 3570)

    series = selectors.traffic_series(window)
    assert len(series) == 60 and series[-1]["start"] == datetime(2026, 6, 1, 12, 30, tzinfo=UTC)
    by_minute = {b["start"].strftime("%H:%M"): b for b in series if b["requests"]}
    assert set(by_minute) == {"12:20", "12:21"}
    first, second = by_minute["12:20"], by_minute["12:21"]
    assert (first["requests"], second["requests"]) == (6, 4)
    assert first["rps"] == pytest.approx(6 / 60)
    assert first["p50_ms"] == pytest.approx(350.0)  # 100..600
    assert second["p95_ms"] == pytest.approx(700 + 0.95 * 3 * 100)  # 700..1000
    assert (first["error_rate"], second["error_rate"]) == (0.0, 0.5)
    assert series[0]["requests"] == 0 and series[0]["p50_ms"] is None


def test_admin_home_is_the_dashboard_with_the_same_figures(users):
    traffic(timezone.now() - timedelta(minutes=5))
    response = client_for(users[Role.ADMIN]).get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Welcome, ada" in html
    assert re.search(r'id="ops-p50">550<', html)
    assert re.search(r'id="ops-p95">955<', html)
    assert re.search(r'id="ops-error-rate">20\.0%<', html)
    assert "10 requests" in html
    # Drawn server-side: one polyline per series with data, nothing fetched by script.
    assert html.count('data-line="requests"') == 1
    assert 'data-line="p95"' in html and "<script src" not in html.split("</head>")[1]
    # The whole figure block polls its own fragment.
    assert 'hx-get="/" hx-trigger="every 5s"' in html


def test_fragment_refresh_returns_only_the_dashboard(users):
    client = client_for(users[Role.ADMIN])
    first = client.get("/", HTTP_HX_REQUEST="true").content.decode()
    assert first.lstrip().startswith('<div id="ops-dashboard"') and "<html" not in first
    assert 'id="ops-p50">—<' in first
    make_usage(at=timezone.now() - timedelta(seconds=5), latency_ms=42.0)
    second = client.get("/", HTTP_HX_REQUEST="true").content.decode()
    assert 'id="ops-p50">42<' in second


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_other_roles_keep_their_home_page(users, role):
    make_usage(at=timezone.now(), outcome=Outcome.ERROR)
    response = client_for(users[role]).get("/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert "ops-dashboard" not in html and "Recent failures" not in html
    assert "API keys" in html


@pytest.fixture
def gpu_worker():
    """A heartbeat as a GPU worker sends it (this machine's inventory plus one GPU)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    name = "gpu@dashboard-test"
    payload = heartbeat_payload(name, pool="threads", serving=True)
    payload["gpus"] = [
        {"index": 0, "name": "NVIDIA H100", "memory_total_mib": 81559, "memory_free_mib": 80000}
    ]
    client.set(redis_keys.heartbeat_key(name), json.dumps(payload), ex=60)
    client.sadd(redis_keys.WORKERS_SET, name)
    yield name
    client.delete(redis_keys.heartbeat_key(name))
    client.srem(redis_keys.WORKERS_SET, name)


def test_dashboard_shows_workers_finetunes_and_failures(users, gpu_worker, finetune_job):
    failed_job = FineTuneJob.objects.create(
        **finetune_job, name="broken-run", state=JobState.FAILED, reason="CUDA out of memory"
    )
    running = FineTuneJob.objects.create(
        **finetune_job, name="good-run", state=JobState.RUNNING, step=30, max_steps=120
    )
    make_usage(at=timezone.now(), outcome=Outcome.UNAVAILABLE, deployment="gone")
    make_usage(at=timezone.now(), outcome=Outcome.CLIENT_ERROR, deployment="typo")

    html = client_for(users[Role.ADMIN]).get("/").content.decode()

    worker_row = re.search(rf'<tr data-worker="{gpu_worker}">.*?</tr>', html, re.S).group(0)
    assert "online" in worker_row and "GPU 0: NVIDIA H100" in worker_row
    assert "80,000 of 81,559 MiB free" in worker_row
    job_row = re.search(rf'<tr data-job="{running.pk}">.*?</tr>', html, re.S).group(0)
    assert "good-run" in job_row and "25%" in job_row
    assert f'data-failed-job="{failed_job.pk}"' in html and "CUDA out of memory" in html
    failures = html.split('id="ops-failures"')[1]
    assert "gone" in failures and "Deployment unavailable (503)" in failures
    assert "typo" not in failures  # a client's bad request is not the box's failure


@pytest.fixture
def finetune_job(users, settings, tmp_path) -> dict:
    """What a fine-tune row needs: a base model version and a dataset version."""
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="tiny", licence="mit")
    version = model_version_ingest(
        actor=admin,
        repo=repo,
        staged=artifact_store().stage_copy(write_tiny_gguf(tmp_path / "tiny.gguf")),
        file_name="tiny.gguf",
        source_kind=SourceKind.UPLOAD,
        source={},
    ).version
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    dataset = dataset_create(actor=admin, name="train", licence="cc0-1.0")
    dataset_version = dataset_version_ingest(
        actor=admin,
        dataset=dataset,
        staged=artifact_store().stage_copy(data),
        file_name="train.jsonl",
        source_kind=SourceKind.UPLOAD,
        source={},
    )
    return {"base_model": version, "dataset_version": dataset_version, "output_repo": "tuned"}


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_figures_refresh_in_the_browser_without_a_reload(browser, live_server):
    from playwright.sync_api import expect

    from tests.conftest import PASSWORD, make_user

    make_user(Role.ADMIN, username="ada")
    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        page.goto("/login/")
        page.get_by_label("Username").fill("ada")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#ops-p50")).to_have_text("—")
        page.evaluate("window.__not_reloaded = true")

        make_usage(at=timezone.now(), latency_ms=321.0, deployment="live-chat")

        # The next poll (every 5 s) brings the new figures into the same page.
        expect(page.locator("#ops-p50")).to_have_text("321", timeout=15_000)
        expect(page.locator("#ops-deployments, #ops-failures")).to_have_count(2)
        expect(page.locator('polyline[data-line="p50"]')).to_have_count(1)
        assert page.evaluate("window.__not_reloaded") is True
    finally:
        context.close()
