"""The database role the app runs as (``manage.py db_app_role``, apps/core/database.py):
rows yes, schema no, and the audit log append-only even against the app itself.

Every live test runs its web servers and workers as such a role (tests/live.py), which
shows the privileges are enough; this file shows they are not more than that.
"""

from __future__ import annotations

import subprocess
import sys
from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.audit.services import audit_record
from tests.conftest import make_user
from tests.live import ROOT, process_env

PASSWORD = "app-role-test-password"


@pytest.fixture
def app_role(transactional_db, settings):
    """A role of this test's own, created by the command; dropped afterwards."""
    role = f"{connection.settings_dict['NAME']}_app_cmd"
    settings.DATABASE_APP_ROLE = role
    settings.DATABASE_APP_PASSWORD = PASSWORD
    yield role
    with connection.cursor() as cursor:
        cursor.execute(f'DROP OWNED BY "{role}"')
        cursor.execute(f'DROP ROLE "{role}"')


def as_role(role: str) -> psycopg.Connection:
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        dbname=db["NAME"],
        user=role,
        password=PASSWORD,
        autocommit=True,
    )


def test_the_command_creates_the_role_once_and_audits_it(app_role):
    out = StringIO()
    call_command("db_app_role", stdout=out)
    assert f"Database role {app_role!r} created" in out.getvalue()
    events = AuditEvent.objects.filter(action="database.app_role.grant")
    assert [e.target_id for e in events] == [app_role]

    out = StringIO()
    call_command("db_app_role", stdout=out)  # bin/aibox runs it at every start
    assert "unchanged" in out.getvalue()
    assert events.count() == 1

    out = StringIO()
    call_command("db_app_role", "--print-url", stdout=out)
    url = out.getvalue().strip()
    assert url.startswith(f"postgres://{app_role}:{PASSWORD}@")
    assert url.endswith(f"/{connection.settings_dict['NAME']}")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_auditevent SET action = 'forged'",
        "DELETE FROM audit_auditevent",
        "TRUNCATE audit_auditevent",
        "ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only",
        "DROP TRIGGER audit_event_no_truncate ON audit_auditevent",
        "DROP TABLE accounts_user CASCADE",
        "CREATE TABLE stash (id int)",
        "INSERT INTO django_migrations (app, name, applied) VALUES ('x', 'y', now())",
    ],
)
def test_the_app_role_cannot_touch_the_schema_or_rewrite_the_audit_log(app_role, statement):
    call_command("db_app_role", stdout=StringIO())
    admin = make_user(Role.ADMIN)
    audit_record(actor=admin, action="test.event")
    with as_role(app_role) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        # Still there and readable: reading and appending are what the app needs.
        assert conn.execute("SELECT count(*) FROM audit_auditevent").fetchone()[0] >= 1


def test_the_app_works_as_its_role_and_the_chain_still_verifies(app_role, tmp_path):
    """Through Django itself, in a process of its own: a user with audit events is
    deleted (the events' actor link is cleared), events are appended, the chain verifies."""
    call_command("db_app_role", stdout=StringIO())
    leaver = make_user(Role.DATA_SCIENTIST, username="leaver")
    audit_record(actor=leaver, action="test.by_leaver")
    out = StringIO()
    call_command("db_app_role", "--print-url", stdout=out)
    script = (
        "import django; django.setup()\n"
        "from django.core.management import call_command\n"
        "from apps.accounts.models import User\n"
        "from apps.accounts.services import system_user\n"
        "from apps.audit.services import audit_record\n"
        "User.objects.get(username='leaver').delete()\n"
        "audit_record(actor=system_user(), action='test.after_leaving')\n"
        "call_command('audit_verify')\n"
    )
    env = process_env(
        DATABASE_URL=out.getvalue().strip(),
        DJANGO_SETTINGS_MODULE="aibox.settings",
        AIBOX_AUDIT_CHECKPOINT_FILE=str(tmp_path / "checkpoints.jsonl"),
    )
    result = subprocess.run(  # noqa: S603 - our interpreter, our script
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Audit chain OK" in result.stdout, result.stdout
    event = AuditEvent.objects.get(action="test.by_leaver")
    assert event.actor_id is None and event.actor_label == "leaver"
    assert AuditEvent.objects.filter(action="test.after_leaving").exists()


def test_the_command_refuses_the_owner_or_a_superuser(transactional_db, settings):
    settings.DATABASE_APP_ROLE = connection.settings_dict["USER"] or "postgres"
    with pytest.raises(CommandError, match="the role this command connects as"):
        call_command("db_app_role", stdout=StringIO())

    superuser = f"{connection.settings_dict['NAME']}_super"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{superuser}" SUPERUSER')
    try:
        settings.DATABASE_APP_ROLE = superuser
        with pytest.raises(CommandError, match="is a superuser"):
            call_command("db_app_role", stdout=StringIO())
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP ROLE "{superuser}"')


def test_an_empty_role_keeps_one_role(transactional_db, settings):
    settings.DATABASE_APP_ROLE = ""
    out = StringIO()
    call_command("db_app_role", "--print-url", stdout=out)
    assert out.getvalue() == ""
