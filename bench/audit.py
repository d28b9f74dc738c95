"""Audit log benchmark on a million events: the list page and the streamed exports.

Needs a scratch database (DATABASE_URL): an empty audit table gets the synthetic log of
tests/audit/synthetic.py (--events, default 1,000,000); a table that already holds it
is reused. Then:

  page     the audit page through Django's full stack (test client, a compliance
           officer), p50/p95 over --repeat runs: the first page and a deep keyset page,
           with and without a filter; beside each, the same page's bare SQL
           (ORDER BY seq DESC LIMIT 51 with the same WHERE) as the baseline
  export   CSV and JSON Lines of the whole log, each in a fresh process: events/s and
           peak RSS, against PostgreSQL's own `COPY (SELECT ...) TO STDOUT` of the same
           rows read by psycopg in the same way (also a fresh process)

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/aibox_bench .venv/bin/python bench/audit.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
os.environ.setdefault("AIBOX_DEBUG", "true")


def _django():
    import django
    from django.conf import settings

    django.setup()
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]  # the test client's


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(n: int) -> None:
    from apps.audit.models import AuditEvent
    from tests.audit import synthetic

    count = AuditEvent.objects.count()
    if count == 0:
        started = time.perf_counter()
        synthetic.write_log(n)
        print(f"generated {n:,} events in {time.perf_counter() - started:.1f} s")
    elif count < n or AuditEvent.objects.filter(seq=n, user_agent="synthetic").count() != 1:
        sys.exit(f"the audit table holds {count:,} other events: use an empty scratch database")


def officer():
    from apps.accounts.models import Role, User

    user, _ = User.objects.get_or_create(
        username="bench-officer", defaults={"role": Role.COMPLIANCE_OFFICER}
    )
    return user


def bench_pages(n: int, repeat: int) -> list[tuple[str, list[float], list[float]]]:
    from django.db import connection
    from django.test import Client

    from apps.audit.selectors import audit_event_list
    from apps.provenance.forms import filter_form

    client = Client()
    client.force_login(officer())
    deep = n // 10  # 90% of the way back
    cases = [
        ("first page", ""),
        ("deep page", f"before={deep}"),
        ("first page, actor", "actor=user07"),
        ("deep page, actor", f"actor=user07&before={deep}"),
        ("first page, action prefix", "action=apikey."),
        ("deep page, outcome", f"outcome=denied&before={deep}"),
        ("details text (rare)", "text=needle-500000"),
        ("time window", "since=2026-01-05T00:00&until=2026-01-05T01:00"),
    ]
    from django.http import QueryDict

    results = []
    for label, query in cases:
        page_times, sql_times = [], []
        form, filters = filter_form(QueryDict(query))
        before = form.cleaned_data.get("before") if form.is_bound else None
        qs = audit_event_list(filters=filters, before_seq=before)[:51]
        sql, params = qs.query.sql_with_params()
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get(f"/audit/?{query}")
            page_times.append(time.perf_counter() - started)
            assert response.status_code == 200
            started = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                cursor.fetchall()
            sql_times.append(time.perf_counter() - started)
        results.append((label, page_times, sql_times))
    return results


def one_export(fmt: str) -> dict:
    """Run in a child process: one export (or the COPY baseline), timed."""
    from django.db import connection

    from apps.audit.exports import stream_export
    from apps.audit.selectors import EVENT_COLUMNS, AuditFilters
    from apps.audit.services import audit_export_begin

    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    size = 0
    if fmt == "copy":
        sql = (
            f"COPY (SELECT {', '.join(EVENT_COLUMNS)} FROM audit_auditevent "  # noqa: S608
            "ORDER BY seq) TO STDOUT WITH (FORMAT csv)"
        )
        with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
            for block in copy:
                size += len(block)
        events = connection.cursor().execute("SELECT count(*) FROM audit_auditevent")
        events = events.fetchone()[0]
    else:
        plan = audit_export_begin(actor=officer(), filters=AuditFilters(), fmt=fmt)
        for chunk in stream_export(plan):
            size += len(chunk)
        events = plan.bounds[1] - plan.bounds[0] + 1
    seconds = time.perf_counter() - started
    return {
        "fmt": fmt,
        "events": events,
        "seconds": seconds,
        "mb": size / 1e6,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_at_start_mb": rss_before,
    }


def run_child(fmt: str) -> dict:
    out = subprocess.run(  # noqa: S603 - this script, by its own path
        [sys.executable, __file__, "--child", fmt],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-exports", action="store_true")
    args = parser.parse_args()
    _django()
    if args.child:
        print(json.dumps(one_export(args.child)))
        return
    prepare(args.events)

    print(f"\nAudit page, {args.repeat} runs each (ms)")
    print(f"{'case':28} {'page p50':>9} {'page p95':>9} {'SQL p50':>8} {'SQL p95':>8} {'ratio':>6}")
    for label, page, sql in bench_pages(args.events, args.repeat):
        p50, s50 = statistics.median(page) * 1000, statistics.median(sql) * 1000
        print(
            f"{label:28} {p50:9.1f} {pct(page, 0.95) * 1000:9.1f} {s50:8.2f} "
            f"{pct(sql, 0.95) * 1000:8.2f} {p50 / s50:6.1f}"
        )
    if args.skip_exports:
        return

    print("\nExports of the whole log, each in a fresh process")
    rows = [run_child(fmt) for fmt in ("copy", "csv", "jsonl")]
    baseline = rows[0]
    base_rate = baseline["events"] / baseline["seconds"]
    print(
        f"{'export':8} {'events':>10} {'seconds':>8} {'events/s':>10} {'vs COPY':>8} "
        f"{'MB':>7} {'peak RSS MB':>12}"
    )
    for row in rows:
        rate = row["events"] / row["seconds"]
        name = "COPY" if row["fmt"] == "copy" else row["fmt"]
        print(
            f"{name:8} {row['events']:10,} {row['seconds']:8.1f} {rate:10,.0f} "
            f"{rate / base_rate:8.2f} {row['mb']:7.0f} {row['peak_rss_mb']:12.0f}"
        )


if __name__ == "__main__":
    main()
