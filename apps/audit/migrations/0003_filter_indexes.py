from django.contrib.postgres.indexes import GinIndex, OpClass
from django.contrib.postgres.operations import TrigramExtension
from django.db import migrations, models
from django.db.models.functions import Cast, Upper


class Migration(migrations.Migration):
    """Indexes for the audit log's filters, each ending in seq so that a filtered page
    is read in keyset order without sorting; free text through a trigram index."""

    dependencies = [("audit", "0002_append_only_trigger")]

    operations = [
        TrigramExtension(),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(Upper("actor_label"), "seq", name="audit_actor_upper_seq"),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["outcome", "-seq"], name="audit_outcome_seq"),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["target_type", "target_id", "-seq"], name="audit_target_seq"),
        ),
        migrations.RemoveIndex(model_name="auditevent", name="audit_audit_target__59bbff_idx"),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(
                OpClass("action", name="varchar_pattern_ops"), "seq", name="audit_action_prefix"
            ),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=GinIndex(
                OpClass(Upper(Cast("details", models.TextField())), name="gin_trgm_ops"),
                name="audit_details_trgm",
            ),
        ),
    ]
