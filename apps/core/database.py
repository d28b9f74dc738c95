"""The database role the running app connects as: rows, not the schema.

Migrations run as the tables' owner. Web, workers and beat connect as a role that owns
nothing: it may read and write rows, but not change the schema, TRUNCATE, or drop or
disable a trigger, so the audit log's triggers hold against the app itself. On the
audit table it may only read and add events, and clear an event's link to a deleted
user (Django's ``SET_NULL``, which the append-only trigger checks leaves the hash chain
alone). ``django_migrations`` is read-only: ``migrate`` as this role does nothing when
the schema is current and fails when migrations are pending.

``app_role_grant`` is idempotent: ``bin/aibox run`` and Compose's ``migrate`` service
call it (``manage.py db_app_role``) after every ``migrate``, so tables added by a new
migration are granted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from django.db import connection, transaction
from psycopg import sql

from apps.accounts.models import User
from apps.audit.models import AuditEvent
from apps.audit.services import audit_record

ROW_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


class AppRoleError(Exception):
    """The role cannot be set up as asked; the message says why."""


@dataclass(frozen=True)
class AppRoleResult:
    created: bool
    changed: bool


def _privileges(cursor, role: str) -> set[tuple[str, str, str]]:
    """What the role holds on the tables of the public schema, column grants included."""
    cursor.execute(
        "SELECT table_name, privilege_type, '' FROM information_schema.role_table_grants "
        "WHERE grantee = %s AND table_schema = 'public' "
        "UNION SELECT table_name, privilege_type, column_name "
        "FROM information_schema.role_column_grants "
        "WHERE grantee = %s AND table_schema = 'public'",
        [role, role],
    )
    return set(cursor.fetchall())


def app_role_grant(*, actor: User, role: str, password: str) -> AppRoleResult:
    """Create ``role`` if needed, set its password, and give it exactly the privileges
    the running app needs on the current database (as the tables' owner, who runs this).

    Audited (``database.app_role.grant``) when the role is new or its privileges changed.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        result = app_role_privileges_set(
            cursor, role=role, password=password, database=connection.settings_dict["NAME"]
        )
        if result.created or result.changed:
            audit_record(
                actor=actor,
                action="database.app_role.grant",
                target_type="database.role",
                target_id=role,
                target_label=role,
                details={
                    "database": connection.settings_dict["NAME"],
                    "created": result.created,
                    "audit_table": "SELECT, INSERT",
                },
            )
    return result


def app_role_privileges_set(cursor, *, role: str, password: str, database: str) -> AppRoleResult:
    """The SQL of ``app_role_grant`` on any DB-API cursor connected as the owner
    (the tests' harness uses it on a connection of its own, unaudited)."""
    audit_table = sql.Identifier(AuditEvent._meta.db_table)
    ident = sql.Identifier(role)
    cursor.execute("SELECT current_user")
    (owner,) = cursor.fetchone()
    if role == owner:
        raise AppRoleError(
            f"The app role {role!r} is the role this command connects as; connect as "
            "the tables' owner (DATABASE_URL) and name another role for the app."
        )
    cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role])
    row = cursor.fetchone()
    if row is not None and row[0]:
        raise AppRoleError(f"{role!r} is a superuser: the app's role must not be one.")
    created = row is None
    before = set() if created else _privileges(cursor, role)
    if created:
        cursor.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    statements = [
        sql.SQL(
            "ALTER ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
            "NOREPLICATION NOBYPASSRLS PASSWORD {}"
        ).format(ident, sql.Literal(password) if password else sql.SQL("NULL")),
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), ident),
        sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(ident),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident),
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(ident),
        sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA public TO {}").format(
            sql.SQL(ROW_PRIVILEGES), ident
        ),
        sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident),
        # The audit log: read and append; the one UPDATE is the actor link's SET_NULL.
        sql.SQL("REVOKE UPDATE, DELETE ON {} FROM {}").format(audit_table, ident),
        sql.SQL("GRANT UPDATE (actor_id) ON {} TO {}").format(audit_table, ident),
        sql.SQL("REVOKE INSERT, UPDATE, DELETE ON django_migrations FROM {}").format(ident),
        # Tables a later migration creates, before the next run of this function.
        sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {} ON TABLES TO {}").format(
            sql.SQL(ROW_PRIVILEGES), ident
        ),
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {}"
        ).format(ident),
    ]
    for statement in statements:
        cursor.execute(statement)
    return AppRoleResult(created=created, changed=_privileges(cursor, role) != before)


def app_role_url(*, role: str, password: str) -> str:
    """The URL the app connects with: the current database, as ``role``."""
    db = connection.settings_dict
    credentials = quote(role, safe="") + (f":{quote(password, safe='')}" if password else "")
    host = db.get("HOST") or "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"postgres://{credentials}@{host}:{db.get('PORT') or 5432}/{quote(db['NAME'], safe='')}"
