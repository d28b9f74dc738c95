"""Every deployment made before revisions gets revision 1: what it runs now."""

from django.db import migrations, models

# services.REVISION_FIELDS as they were when revisions came in.
FIELDS = (
    "adapter_scale",
    "context_length",
    "threads",
    "gpu_layers",
    "batch_size",
    "parallel_slots",
    "embeddings",
    "kv_cache_type",
    "flash_attention",
    "stream_interval_ms",
    "preset",
    "chat_template",
)


def forwards(apps, schema_editor):
    Deployment = apps.get_model("deployments", "Deployment")
    Revision = apps.get_model("deployments", "Revision")
    Replica = apps.get_model("deployments", "Replica")
    for deployment in Deployment.objects.filter(revision__isnull=True):
        revision = Revision.objects.create(
            deployment=deployment,
            number=1,
            model_version_id=deployment.model_version_id,
            adapter_id=deployment.adapter_id,
            values={f: getattr(deployment, f) for f in FIELDS},
            label="created",
            state="active",
            created_by_id=deployment.created_by_id,
            created_at=deployment.created_at,
            activated_at=deployment.created_at,
        )
        Deployment.objects.filter(pk=deployment.pk).update(revision=revision)
        Replica.objects.filter(deployment=deployment).update(revision=revision)


class Migration(migrations.Migration):
    dependencies = [("deployments", "0005_revisions")]

    operations = [
        migrations.RunPython(forwards, migrations.RunPython.noop),
        # A revision's replicas are numbered from 0 beside the serving revision's.
        migrations.RemoveConstraint(model_name="replica", name="deployment_replica_index"),
        migrations.AddConstraint(
            model_name="replica",
            constraint=models.UniqueConstraint(
                fields=["revision", "index"], name="revision_replica_index"
            ),
        ),
    ]
