from django.apps import AppConfig


class ProvenanceConfig(AppConfig):
    """Provenance and compliance: lineage, the ML-BOM, model dossiers, period reports and
    the audit log's pages. The top app: it reads every other, and none reads it."""

    name = "apps.provenance"
    label = "provenance"
