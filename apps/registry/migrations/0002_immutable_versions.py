from django.db import migrations

# A version's content and provenance never change; only its lifecycle columns do
# (and created_by may be cleared by ON DELETE SET NULL). Versions are never deleted.
CREATE = """
CREATE FUNCTION registry_version_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mutable text[] := ARRAY['state', 'state_changed_by_id', 'state_changed_at', 'state_reason',
                            'created_by_id'];
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(NEW) - mutable) = (to_jsonb(OLD) - mutable)
       AND (NEW.created_by_id IS NOT DISTINCT FROM OLD.created_by_id OR NEW.created_by_id IS NULL)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'model versions are immutable: % refused on registry_modelversion (id %)',
        TG_OP, OLD.id
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER registry_version_immutable
    BEFORE UPDATE OR DELETE ON registry_modelversion
    FOR EACH ROW EXECUTE FUNCTION registry_version_immutable();
"""

DROP = """
DROP TRIGGER IF EXISTS registry_version_immutable ON registry_modelversion;
DROP FUNCTION IF EXISTS registry_version_immutable();
"""


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]

    operations = [migrations.RunSQL(CREATE, DROP)]
