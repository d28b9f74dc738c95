from django.db import migrations

# TRUNCATE skips row triggers, so append-only needs a statement trigger of its own. It
# also catches TRUNCATE ... CASCADE from a table the audit log refers to (users).
# The test suite's database flush between tests sets aibox.allow_audit_truncate for its
# own session (tests/conftest.py). That is no weaker than the trigger itself: whoever
# may TRUNCATE the table may also drop the trigger; what stops them is the database role
# the app runs as, and what detects them is the signed checkpoints (docs/security.md).
CREATE = """
CREATE FUNCTION audit_event_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('aibox.allow_audit_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'audit events are append-only: TRUNCATE refused on audit_auditevent'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_event_no_truncate
    BEFORE TRUNCATE ON audit_auditevent
    FOR EACH STATEMENT EXECUTE FUNCTION audit_event_no_truncate();
"""

DROP = """
DROP TRIGGER IF EXISTS audit_event_no_truncate ON audit_auditevent;
DROP FUNCTION IF EXISTS audit_event_no_truncate();
"""


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_filter_indexes")]

    operations = [migrations.RunSQL(CREATE, DROP)]
