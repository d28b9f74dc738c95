"""A version's CycloneDX 1.6 ML-BOM: the version and everything it was made from
(``apps.provenance.lineage``'s ancestry), models as ``machine-learning-model`` and
datasets as ``data`` components."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from importlib.metadata import version as package_version
from typing import Any

from django.utils import timezone

from apps.provenance.lineage import DATASET, FINETUNE, MODEL, Lineage
from apps.registry.licences import spdx_for_cyclonedx, version_licence
from apps.registry.models import Format, ModelVersion, SourceKind

SPEC_VERSION = "1.6"


def bom_file_name(version: ModelVersion) -> str:
    return f"{version.repo.name}-v{version.number}.cdx.json"


def _hashes(sha256: str) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": sha256}]


def _properties(values: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"name": f"aibox:{k}", "value": str(v)} for k, v in values.items() if v not in (None, "")
    ]


def _source_references(v: ModelVersion, absolute: Any) -> list[dict[str, str]]:
    source = v.source or {}
    refs: list[dict[str, str]] = []
    if v.source_kind == SourceKind.HUGGING_FACE and source.get("repo_id"):
        endpoint = source.get("endpoint") or "https://huggingface.co"
        revision = source.get("commit") or source.get("revision") or "main"
        refs.append(
            {
                "type": "distribution",
                "url": f"{endpoint}/{source['repo_id']}/resolve/{revision}/{source['filename']}",
                "comment": f"Imported from Hugging Face {source['repo_id']} at {revision}.",
            }
        )
    elif v.source_kind == SourceKind.BUNDLED and source.get("upstream"):
        refs.append(
            {
                "type": "distribution",
                "url": source["upstream"],
                "comment": f"Upstream of the bundled package {source.get('package', '')}.",
            }
        )
    if v.repo.licence_url:
        refs.append({"type": "license", "url": v.repo.licence_url})
    refs.append(
        {
            "type": "other",
            "url": absolute(v.get_absolute_url()),
            "comment": f"This version in AIBox ({v.get_source_kind_display()}).",
        }
    )
    return refs


def _model_component(v: ModelVersion, datasets: Iterable, absolute: Any) -> dict[str, Any]:
    licence = spdx_for_cyclonedx(version_licence(v))
    component: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": f"{MODEL}:{v.pk}",
        "name": v.repo.name,
        "version": str(v.number),
        "description": v.repo.description or f"{v} ({v.get_format_display()})",
        "hashes": _hashes(v.sha256),
        "externalReferences": _source_references(v, absolute),
        "properties": _properties(
            {
                "file_name": v.file_name,
                "format": v.format,
                "size": v.size,
                "state": v.state,
                "source_kind": v.source_kind,
                "created_by": v.created_by.username if v.created_by else "",
                "created_at": v.created_at.isoformat(),
                "quantization": v.quantization,
                "parameter_count": v.parameter_count,
                "context_length": v.context_length,
                "finetune_job": (v.source or {}).get("finetune_job"),
            }
        ),
    }
    if licence:
        component["licenses"] = [licence]
    if v.source_kind == SourceKind.HUGGING_FACE and v.source.get("repo_id"):
        commit = v.source.get("commit")
        component["purl"] = f"pkg:huggingface/{v.source['repo_id']}" + (
            f"@{commit}" if commit else ""
        )
    adapter = v.format in (Format.GGUF_LORA, Format.PEFT_SAFETENSORS)
    parameters: dict[str, Any] = {
        "task": "text-generation",
        "modelArchitecture": v.architecture or ("LoRA adapter" if adapter else ""),
    }
    if v.source_kind == SourceKind.FINE_TUNE:
        parameters["approach"] = {"type": "supervised"}
    refs = [{"ref": f"{DATASET}:{d.pk}"} for d in datasets]
    if refs:
        parameters["datasets"] = refs
    component["modelCard"] = {
        "modelParameters": {k: val for k, val in parameters.items() if val},
    }
    metrics = [
        {"type": name, "value": str(value)}
        for name, value in (
            ("final training loss", (v.source or {}).get("final_train_loss")),
            ("final validation loss", (v.source or {}).get("final_validation_loss")),
        )
        if value is not None
    ]
    if metrics:
        component["modelCard"]["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    return component


def _dataset_component(d, absolute: Any) -> dict[str, Any]:
    component: dict[str, Any] = {
        "type": "data",
        "bom-ref": f"{DATASET}:{d.pk}",
        "name": d.dataset.name,
        "version": str(d.number),
        "description": d.dataset.description or str(d),
        "hashes": _hashes(d.sha256),
        "data": [
            {
                "type": "dataset",
                "name": str(d),
                "description": d.dataset.source or f"{d.get_format_display()} file {d.file_name}",
            }
        ],
        "externalReferences": [
            {"type": "other", "url": absolute(d.get_absolute_url()), "comment": "In AIBox."}
        ],
        "properties": _properties(
            {
                "file_name": d.file_name,
                "format": d.format,
                "rows": d.rows,
                "state": d.state,
                "source_kind": d.source_kind,
                "transformation": (d.transformation or {}).get("operation"),
            }
        ),
    }
    licence = spdx_for_cyclonedx(d.dataset.licence)
    if licence:
        component["licenses"] = [licence]
    return component


def lineage_bom(lineage: Lineage, *, absolute: Any = lambda url: url) -> dict[str, Any]:
    """A CycloneDX 1.6 ML-BOM of the root version and everything it was made from.

    Models are ``machine-learning-model`` components and datasets ``data`` components,
    each with its SHA-256, licence and references to its source; ``dependencies`` say
    what each was made from, and a fine-tuned model's card names its datasets.
    ``absolute`` turns a path into an absolute URL (the request's).
    """
    keep = {n.key for n in lineage.nodes.values() if n.relation in ("root", "ancestor")}
    inputs: dict[str, list[str]] = {k: [] for k in keep}
    for e in lineage.edges:
        if e.source in keep and e.target in keep:
            inputs[e.target].append(e.source)

    def direct(key: str) -> list[str]:
        # A fine-tune is not a component: what it took in is what its output depends on.
        found: list[str] = []
        for source in inputs[key]:
            found += direct(source) if source.startswith(FINETUNE) else [source]
        return list(dict.fromkeys(found))

    components: dict[str, dict[str, Any]] = {}
    for key in keep:
        node = lineage.nodes[key]
        if node.kind == MODEL:
            datasets = [
                lineage.nodes[k].obj for k in direct(key) if lineage.nodes[k].kind == DATASET
            ]
            components[key] = _model_component(node.obj, datasets, absolute)
        elif node.kind == DATASET:
            components[key] = _dataset_component(node.obj, absolute)
    root = components.pop(lineage.root.key)
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": timezone.now().replace(microsecond=0).isoformat(),
            "tools": {
                "components": [
                    {"type": "application", "name": "AIBox", "version": package_version("aibox")}
                ]
            },
            "component": root,
        },
        "components": sorted(components.values(), key=lambda c: c["bom-ref"]),
        "dependencies": [
            {"ref": key, "dependsOn": [k for k in direct(key) if k in keep]}
            for key in sorted(keep)
            if lineage.nodes[key].kind in (MODEL, DATASET)
        ],
    }
