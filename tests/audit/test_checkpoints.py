"""TRUNCATE is refused, and events cut from the end of the log are caught by audit_verify
through the signed checkpoints kept outside the database."""

import json
import stat

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction

from apps.audit.checkpoints import checkpoint_write
from apps.audit.selectors import audit_chain_verify
from apps.audit.services import audit_record


def record_some(actor, n: int) -> None:
    for i in range(n):
        audit_record(actor=actor, action="test.event", target=actor, details={"i": i})


def as_table_owner(*statements: str) -> None:
    """What a role that owns the table can do despite the triggers: switch them off."""
    with connection.cursor() as cursor:
        # The test's own inserts leave deferred foreign-key checks pending until commit.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER USER")
        for statement in statements:
            cursor.execute(statement)
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER USER")


@pytest.mark.parametrize(
    "statement", ["TRUNCATE audit_auditevent", "TRUNCATE accounts_user CASCADE"]
)
def test_truncate_is_refused(admin_user, statement):
    record_some(admin_user, 2)
    with (
        pytest.raises(DatabaseError, match="append-only: TRUNCATE refused"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # see as_table_owner
        cursor.execute("SET LOCAL aibox.allow_audit_truncate = 'off'")
        cursor.execute(statement)
    assert audit_chain_verify().checked == 2


def test_checkpoints_are_signed_lines_written_when_the_head_moves(admin_user):
    path = settings.AUDIT_CHECKPOINT_FILE
    assert checkpoint_write(path=path) is None  # an empty log has no head
    record_some(admin_user, 3)
    first = checkpoint_write(path=path)
    assert first.seq == 3
    assert checkpoint_write(path=path) is None  # the head has not moved
    record_some(admin_user, 1)
    assert checkpoint_write(path=path).seq == 4
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [3, 4]
    assert set(lines[0]) == {"seq", "hash", "at", "key", "signature"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_events_deleted_from_the_end_are_detected(admin_user, capsys):
    record_some(admin_user, 5)
    checkpoint_write(path=settings.AUDIT_CHECKPOINT_FILE)
    call_command("audit_verify")
    assert "names event #5, which is in the log unchanged" in capsys.readouterr().out

    as_table_owner("DELETE FROM audit_auditevent WHERE seq > 3")
    assert audit_chain_verify().ok  # the shorter chain still verifies on its own
    with pytest.raises(CommandError, match="saw the chain reach #5, the database now ends at #3"):
        call_command("audit_verify")


def test_a_truncated_log_is_detected(admin_user):
    record_some(admin_user, 2)
    checkpoint_write(path=settings.AUDIT_CHECKPOINT_FILE)
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # see as_table_owner
        cursor.execute("TRUNCATE audit_auditevent")  # the test session may (conftest.py)
    with pytest.raises(CommandError, match="now ends at #0 .events deleted or the table trunc"):
        call_command("audit_verify")


def test_a_forged_checkpoint_line_is_reported(admin_user):
    record_some(admin_user, 2)
    path = settings.AUDIT_CHECKPOINT_FILE
    checkpoint_write(path=path)
    line = json.loads(path.read_text())
    forged = line | {"seq": 1, "hash": "0" * 64}
    with path.open("a") as out:
        out.write(json.dumps(forged) + "\n")
    with pytest.raises(CommandError, match="line 2: the signature does not verify"):
        call_command("audit_verify")


def test_the_checkpoint_is_on_the_beat_schedule():
    entry = settings.CELERY_BEAT_SCHEDULE["audit-checkpoint"]
    assert entry["task"] == "audit.checkpoint"
