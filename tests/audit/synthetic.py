"""A large, valid audit log, written fast: the chain is computed here in Python and the
rows go in with one PostgreSQL COPY (psycopg's copy), not one INSERT per event.

Used by tests/audit/test_million.py and bench/audit.py. The log is deterministic: event
``i`` (from 1) has

* actor ``user{i % 50:02d}``, action ``ACTIONS[i % len(ACTIONS)]``;
* outcome ``failure`` when ``i % 25 == 0``, ``denied`` when ``i % 101 == 0``, else success;
* target ``registry.modelversion``/``i % 1000`` when ``i % 7 == 0``, else none;
* details ``{"n": i, "note": ...}`` where the note is ``needle-<i>`` for every
  ``NEEDLE_EVERY``-th event and an ordinary word otherwise;
* a timestamp one second after the previous one, from ``START``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

from django.db import connection

from apps.audit.chain import GENESIS_HASH, format_timestamp

START = datetime(2026, 1, 1, tzinfo=UTC)
ACTIONS = (
    "auth.login",
    "auth.logout",
    "model_version.create",
    "model_version.approve",
    "deployment.start",
    "deployment.stop",
    "dataset_version.create",
    "finetune.create",
    "apikey.create",
    "apikey.revoke",
    "user.update",
    "user.role_change",
)
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
NEEDLE_EVERY = 100_000
COLUMNS = (
    "seq",
    "created_at",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "target_label",
    "outcome",
    "source_ip",
    "user_agent",
    "details",
    "prev_hash",
    "hash",
)


def event_fields(i: int) -> dict:
    if i % 101 == 0:
        outcome = "denied"
    elif i % 25 == 0:
        outcome = "failure"
    else:
        outcome = "success"
    targeted = i % 7 == 0
    note = f"needle-{i}" if i % NEEDLE_EVERY == 0 else WORDS[i % len(WORDS)]
    return {
        "seq": i,
        "created_at": START + timedelta(seconds=i),
        "actor_label": f"user{i % 50:02d}",
        "action": ACTIONS[i % len(ACTIONS)],
        "target_type": "registry.modelversion" if targeted else "",
        "target_id": str(i % 1000) if targeted else "",
        "target_label": f"model v{i % 1000}" if targeted else "",
        "outcome": outcome,
        "source_ip": "10.0.0.1",
        "user_agent": "synthetic",
        "details": {"n": i, "note": note},
    }


def write_log(n: int) -> str:
    """COPY ``n`` chained events into an empty audit table; returns the head hash.

    The hash is apps.audit.chain.compute_hash, inlined for speed (the same canonical
    JSON: sorted keys, no spaces, UTF-8); tests verify the result with the real code.
    """
    with connection.cursor() as cursor:
        # Building an index once over a million rows is far faster than updating it a
        # million times (the trigram GIN above all): drop the plain indexes, COPY, and
        # create them again from their own definitions. Constraints stay.
        cursor.execute(
            """SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'audit_auditevent'
               AND indexname NOT IN (SELECT conname FROM pg_constraint)"""
        )
        indexes = cursor.fetchall()
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
    try:
        head = _copy_rows(n)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET maintenance_work_mem = '256MB'")
            for _, definition in indexes:
                cursor.execute(definition)
            cursor.execute("RESET maintenance_work_mem")
            cursor.execute("ANALYZE audit_auditevent")
    return head


def _copy_rows(n: int) -> str:
    prev = GENESIS_HASH
    dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
    sha256 = hashlib.sha256
    sql = f"COPY audit_auditevent ({', '.join(COLUMNS)}) FROM STDIN"  # noqa: S608
    # COPY's text format, written in large blocks: none of the generated values holds
    # a tab, newline or backslash, so no field needs escaping.
    lines: list[str] = []
    with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
        for i in range(1, n + 1):
            fields = event_fields(i)
            created = format_timestamp(fields["created_at"])
            payload = dict(fields, created_at=created)
            digest = sha256((prev + "\n" + dumps(payload)).encode()).hexdigest()
            row = [str(v) for v in fields.values()]
            row[1], row[10] = created, dumps(fields["details"])
            lines.append("\t".join((*row, prev, digest)))
            prev = digest
            if len(lines) == 20_000:
                copy.write(("\n".join(lines) + "\n").encode())
                lines = []
        if lines:
            copy.write(("\n".join(lines) + "\n").encode())
    return prev
