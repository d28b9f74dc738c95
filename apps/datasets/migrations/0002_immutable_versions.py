from django.db import migrations

# A dataset version's file, settings and provenance never change. Its validation
# outcome is written once, while it is still validating; after that the row is frozen
# (created_by and tokenizer may only be cleared by ON DELETE SET NULL). Never deleted.
CREATE = """
CREATE FUNCTION dataset_version_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    nullable text[] := ARRAY['created_by_id', 'tokenizer_id'];
    validation text[] := ARRAY['state', 'state_reason', 'progress_bytes', 'validated_at',
                               'shape', 'rows', 'valid_rows', 'error_count', 'pii_rows',
                               'duplicate_rows', 'report'];
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(NEW) - nullable - validation) = (to_jsonb(OLD) - nullable - validation)
       AND (OLD.state = 'validating' OR (to_jsonb(NEW) - nullable) = (to_jsonb(OLD) - nullable))
       AND (NEW.created_by_id IS NOT DISTINCT FROM OLD.created_by_id OR NEW.created_by_id IS NULL)
       AND (NEW.tokenizer_id IS NOT DISTINCT FROM OLD.tokenizer_id OR NEW.tokenizer_id IS NULL)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'dataset versions are immutable: % refused on datasets_datasetversion (id %)',
        TG_OP, OLD.id
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER dataset_version_immutable
    BEFORE UPDATE OR DELETE ON datasets_datasetversion
    FOR EACH ROW EXECUTE FUNCTION dataset_version_immutable();
"""

DROP = """
DROP TRIGGER IF EXISTS dataset_version_immutable ON datasets_datasetversion;
DROP FUNCTION IF EXISTS dataset_version_immutable();
"""


class Migration(migrations.Migration):
    dependencies = [("datasets", "0001_initial")]

    operations = [migrations.RunSQL(CREATE, DROP)]
