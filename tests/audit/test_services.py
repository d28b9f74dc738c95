import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction

from apps.accounts.models import Role
from apps.audit.chain import GENESIS_HASH, compute_hash
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_chain_verify
from apps.audit.services import audit_record
from tests.conftest import make_user


def record_some(actor, n: int) -> list[AuditEvent]:
    return [
        audit_record(actor=actor, action="test.event", target=actor, details={"i": i, "ü": "✓"})
        for i in range(n)
    ]


def test_events_form_a_verifiable_chain(admin_user, capsys):
    events = record_some(admin_user, 5)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS_HASH
    for prev, event in zip(events, events[1:], strict=False):
        assert event.prev_hash == prev.hash
    # The hash is recomputable from the stored row alone.
    stored = AuditEvent.objects.values().get(seq=3)
    assert compute_hash(stored["prev_hash"], stored) == stored["hash"]

    call_command("audit_verify")
    assert "Audit chain OK: 5 events verified" in capsys.readouterr().out


def test_event_copies_actor_and_target_labels(admin_user):
    event = audit_record(actor=admin_user, action="test.event", target=admin_user)
    assert event.actor_label == "ada"
    assert event.target_type == "accounts.user"
    assert event.target_id == str(admin_user.pk)
    assert event.target_label == "ada"


def test_secrets_in_details_are_redacted(admin_user):
    event = audit_record(
        actor=admin_user,
        action="test.event",
        details={"password": "hunter2", "nested": {"token": "abc"}, "ok": "visible"},
    )
    event.refresh_from_db()
    assert event.details == {
        "password": "[redacted]",
        "nested": {"token": "[redacted]"},
        "ok": "visible",
    }


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_auditevent SET action = 'forged' WHERE seq = 2",
        "UPDATE audit_auditevent SET details = '{}'::jsonb",
        "DELETE FROM audit_auditevent WHERE seq = 2",
    ],
)
def test_database_refuses_to_change_or_delete_events(admin_user, statement):
    record_some(admin_user, 3)
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement)
    assert AuditEvent.objects.get(seq=2).action == "test.event"
    assert AuditEvent.objects.count() == 3


def test_removing_a_user_keeps_their_events(db):
    user = make_user(Role.DATA_SCIENTIST, username="leaver")
    record_some(user, 2)
    user.delete()  # ON DELETE SET NULL is the one change the trigger allows
    assert list(AuditEvent.objects.values_list("actor_id", "actor_label")) == [
        (None, "leaver"),
        (None, "leaver"),
    ]
    assert audit_chain_verify().ok


def _tamper(sql: str) -> None:
    """Change rows behind the trigger's back, as a DBA with superuser rights could."""
    with connection.cursor() as cursor:
        # Django's foreign keys are deferred; settle them so the table can be altered.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        cursor.execute(sql)
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            """UPDATE audit_auditevent SET details = '{"i": 99}' WHERE seq = 4""",
            "event #4: its contents do not match its hash",
        ),
        (
            "UPDATE audit_auditevent SET actor_label = 'someone-else' WHERE seq = 2",
            "event #2: its contents do not match its hash",
        ),
        ("DELETE FROM audit_auditevent WHERE seq = 3", "event #4: event #3 is missing before it"),
        (
            # A forger who recomputes the row's own hash still breaks the next link.
            None,
            "event #4: its prev_hash does not match",
        ),
    ],
)
def test_audit_verify_names_the_first_broken_link(admin_user, sql, message):
    record_some(admin_user, 6)
    if sql is None:
        row = AuditEvent.objects.values().get(seq=3)
        row["action"] = "forged"
        forged_hash = compute_hash(row["prev_hash"], row)
        sql = f"UPDATE audit_auditevent SET action = 'forged', hash = '{forged_hash}' WHERE seq = 3"  # noqa: S608
    _tamper(sql)
    with pytest.raises(CommandError, match="BROKEN") as excinfo:
        call_command("audit_verify")
    assert message in str(excinfo.value)


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_leave_a_valid_chain():
    writers, per_writer = 8, 200
    actors = [make_user(Role.APP_DEVELOPER, username=f"writer{i}") for i in range(writers)]
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def write(actor) -> None:
        try:
            start.wait()
            for i in range(per_writer):
                with transaction.atomic():
                    audit_record(actor=actor, action="test.concurrent", details={"i": i})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(actor,)) for actor in actors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert AuditEvent.objects.count() == writers * per_writer
    result = audit_chain_verify()
    assert result.ok, str(result.error)
    assert result.checked == writers * per_writer
    # Every writer's events are all there, interleaved in one chain.
    for actor in actors:
        assert AuditEvent.objects.filter(actor_label=actor.username).count() == per_writer
