"""Lineage: what a model version came from and what was made of it.

``version_lineage`` walks the provenance links in both directions from one model
version, across model versions (parents and children), dataset versions (their parent
chains, and those a fine-tune trained on), fine-tune jobs and the deployments that
serve a version or use it as an adapter. Edges point the way things flow: from an
input to what was made from it. What the user may not see (another data scientist's
dataset or job) is left out and counted, never shown.

``lineage_layout`` lays the graph out in columns for the lineage page's inline SVG;
``apps.provenance.bom`` turns the ancestry into a CycloneDX ML-BOM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from typing import Any

from django.db.models import Q
from django.urls import reverse

from apps.accounts.models import User
from apps.datasets.models import Dataset
from apps.deployments.models import Deployment
from apps.finetune.models import FineTuneJob
from apps.finetune.selectors import finetune_datasets_of, finetune_jobs_producing
from apps.registry.models import ModelVersion

MODEL = "model_version"
DATASET = "dataset_version"
FINETUNE = "finetune_job"
DEPLOYMENT = "deployment"

KIND_LABELS = {
    MODEL: "model",
    DATASET: "dataset",
    FINETUNE: "fine-tune",
    DEPLOYMENT: "deployment",
}

# Edge kinds, from input to output.
DERIVED = "derived"  # a model version's parent → the version
DATASET_DERIVED = "dataset_derived"  # a dataset version → one derived from it (split…)
BASE_MODEL = "base_model"  # a model version → a fine-tune of it
TRAINING_DATA = "training_data"  # a dataset version → a fine-tune trained on it
VALIDATION_DATA = "validation_data"
PRODUCED = "produced"  # a fine-tune → the adapter it produced
SERVES = "serves"  # a model version → a deployment that serves it
ADAPTER_OF = "adapter_of"  # an adapter → a deployment that loads it


@dataclass
class Node:
    key: str
    kind: str
    pk: int
    label: str
    url: str
    relation: str  # root, ancestor or descendant
    details: dict[str, Any] = field(default_factory=dict)
    obj: Any = field(default=None, repr=False)

    @property
    def kind_label(self) -> str:
        return KIND_LABELS[self.kind]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "kind": self.kind,
            "pk": self.pk,
            "label": self.label,
            "url": self.url,
            "relation": self.relation,
            "details": self.details,
        }


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "target": self.target, "kind": self.kind}


@dataclass
class Lineage:
    root: Node
    nodes: dict[str, Node]
    edges: list[Edge]
    restricted: int  # linked things the user may not see, left out

    def of_relation(self, relation: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.relation == relation]

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root.key,
            "nodes": [n.as_dict() for n in self.nodes.values()],
            "edges": [e.as_dict() for e in self.edges],
            "restricted": self.restricted,
        }


class _Walker:
    def __init__(self, user: User) -> None:
        self.user = user
        self.nodes: dict[str, Node] = {}
        self.edges: dict[tuple[str, str], Edge] = {}
        self.restricted: set[str] = set()
        self.seen_up: set[str] = set()
        self.datasets = Dataset.objects.visible_to(user)
        self.jobs = FineTuneJob.objects.visible_to(user)
        self.deployments = Deployment.objects.visible_to(user)

    # Nodes --------------------------------------------------------------------------
    def model(self, v: ModelVersion, relation: str) -> Node | None:
        key = f"{MODEL}:{v.pk}"
        if key not in self.nodes:
            self.nodes[key] = Node(
                key=key,
                kind=MODEL,
                pk=v.pk,
                label=str(v),
                url=reverse("registry:version", args=[v.pk]),
                relation=relation,
                details={
                    "sha256": v.sha256,
                    "format": v.format,
                    "state": v.state,
                    "source_kind": v.source_kind,
                    "licence": v.repo.licence,
                },
                obj=v,
            )
        return self.nodes[key]

    def dataset(self, d, relation: str) -> Node | None:
        key = f"{DATASET}:{d.pk}"
        if not self.datasets.filter(pk=d.dataset_id).exists():
            self.restricted.add(key)
            return None
        if key not in self.nodes:
            self.nodes[key] = Node(
                key=key,
                kind=DATASET,
                pk=d.pk,
                label=str(d),
                url=reverse("datasets:version", args=[d.pk]),
                relation=relation,
                details={
                    "sha256": d.sha256,
                    "state": d.state,
                    "source_kind": d.source_kind,
                    "licence": d.dataset.licence,
                    "rows": d.rows,
                    "transformation": d.transformation,
                },
                obj=d,
            )
        return self.nodes[key]

    def job(self, j, relation: str) -> Node | None:
        key = f"{FINETUNE}:{j.pk}"
        if not self.jobs.filter(pk=j.pk).exists():
            self.restricted.add(key)
            return None
        if key not in self.nodes:
            self.nodes[key] = Node(
                key=key,
                kind=FINETUNE,
                pk=j.pk,
                label=str(j),
                url=reverse("finetune:job", args=[j.pk]),
                relation=relation,
                details={"state": j.state, "params": j.params},
                obj=j,
            )
        return self.nodes[key]

    def deployment(self, dep, relation: str) -> Node | None:
        key = f"{DEPLOYMENT}:{dep.pk}"
        if not self.deployments.filter(pk=dep.pk).exists():
            self.restricted.add(key)
            return None
        if key not in self.nodes:
            self.nodes[key] = Node(
                key=key,
                kind=DEPLOYMENT,
                pk=dep.pk,
                label=f"deployment {dep.name}",
                url=reverse("deployments:detail", args=[dep.name]),
                relation=relation,
                details={"name": dep.name, "state": dep.state},
                obj=dep,
            )
        return self.nodes[key]

    def edge(self, source: Node | None, target: Node | None, kind: str) -> None:
        if source is not None and target is not None:
            self.edges.setdefault((source.key, target.key), Edge(source.key, target.key, kind))

    # Walks --------------------------------------------------------------------------
    def up(self, node: Node) -> None:
        """Add everything ``node`` was made from, recursively."""
        todo = [node]
        while todo:
            current = todo.pop()
            new: list[Node] = []
            if current.kind == MODEL:
                v: ModelVersion = current.obj
                job_bases: set[int] = set()
                for j in finetune_jobs_producing(v):
                    jn = self.job(j, "ancestor")
                    if jn is None:
                        continue
                    job_bases.add(j.base_model_id)
                    self.edge(jn, current, PRODUCED)
                    new.append(jn)
                for parent in v.parents.select_related("repo", "artifact"):
                    pn = self.model(parent, "ancestor")
                    if parent.pk not in job_bases:  # else the job's edges say it
                        self.edge(pn, current, DERIVED)
                    new.append(pn)
                if not job_bases:  # the job is hidden or gone: the data still binds it
                    for d in finetune_datasets_of(v):
                        dn = self.dataset(d, "ancestor")
                        self.edge(dn, current, TRAINING_DATA)
                        new += [dn] if dn else []
            elif current.kind == FINETUNE:
                j = current.obj
                bn = self.model(j.base_model, "ancestor")
                self.edge(bn, current, BASE_MODEL)
                new.append(bn)
                for d, kind in (
                    (j.dataset_version, TRAINING_DATA),
                    (j.validation_version, VALIDATION_DATA),
                ):
                    if d is not None:
                        dn = self.dataset(d, "ancestor")
                        self.edge(dn, current, kind)
                        new += [dn] if dn else []
            elif current.kind == DATASET and current.obj.parent_id:
                parent = (
                    type(current.obj)
                    .objects.select_related("dataset", "artifact")
                    .get(pk=current.obj.parent_id)
                )
                pn = self.dataset(parent, "ancestor")
                self.edge(pn, current, DATASET_DERIVED)
                new += [pn] if pn else []
            todo += [n for n in new if n is not None and n.key not in self.seen_up]
            self.seen_up.update(n.key for n in new if n is not None)

    def down(self, node: Node) -> None:
        """Add everything made from ``node``, recursively."""
        todo = [node]
        seen = {node.key}
        while todo:
            current = todo.pop()
            new: list[Node] = []
            if current.kind == MODEL:
                v: ModelVersion = current.obj
                jobs = FineTuneJob.objects.filter(base_model=v).select_related(
                    "adapter__repo", "peft_adapter__repo"
                )
                produced_by_job: set[int] = set()
                for j in jobs:
                    jn = self.job(j, "descendant")
                    if jn is None:
                        continue
                    self.edge(current, jn, BASE_MODEL)
                    new.append(jn)
                    produced_by_job |= {j.adapter_id, j.peft_adapter_id}
                for child in v.children.select_related("repo", "artifact"):
                    cn = self.model(child, "descendant")
                    if child.pk not in produced_by_job:
                        self.edge(current, cn, DERIVED)
                    new.append(cn)
                for dep in Deployment.objects.filter(Q(model_version=v) | Q(adapter=v)):
                    dn = self.deployment(dep, "descendant")
                    self.edge(current, dn, SERVES if dep.model_version_id == v.pk else ADAPTER_OF)
                    new += [dn] if dn else []
            elif current.kind == FINETUNE:
                j = current.obj
                for out in (j.adapter, j.peft_adapter):
                    if out is not None:
                        on = self.model(out, "descendant")
                        self.edge(current, on, PRODUCED)
                        new.append(on)
            todo += [n for n in new if n.key not in seen]
            seen.update(n.key for n in new)


def version_lineage(*, user: User, version: ModelVersion) -> Lineage:
    """The ancestors and descendants of ``version`` that ``user`` may see, as a graph."""
    walker = _Walker(user)
    root = walker.model(version, "root")
    walker.seen_up.add(root.key)
    walker.up(root)
    walker.down(root)
    return Lineage(
        root=root,
        nodes=walker.nodes,
        edges=list(walker.edges.values()),
        restricted=len(walker.restricted),
    )


# Layout for the page's SVG --------------------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 180, 46, 44, 18, 10


@dataclass
class Placed:
    node: Node
    x: int
    y: int


def lineage_layout(lineage: Lineage) -> dict[str, Any]:
    """Columns by longest path from the oldest inputs (a layered layout), rows in order
    within a column; coordinates for an inline SVG."""
    preds: dict[str, set[str]] = {key: set() for key in lineage.nodes}
    for e in lineage.edges:
        preds[e.target].add(e.source)
    layer: dict[str, int] = {}
    order = list(TopologicalSorter(preds).static_order())
    for key in order:
        layer[key] = max((layer[p] + 1 for p in preds[key]), default=0)
    # Then each input moves right, next to the first thing made from it, so an edge does
    # not run across the column between (a base model sits beside the data it met).
    succs: dict[str, list[str]] = {key: [] for key in lineage.nodes}
    for e in lineage.edges:
        succs[e.source].append(e.target)
    for key in reversed(order):
        if succs[key]:
            layer[key] = min(layer[t] for t in succs[key]) - 1
    low = min(layer.values())
    layer = {key: value - low for key, value in layer.items()}
    columns: dict[int, list[str]] = {}
    for key in lineage.nodes:  # nodes keep the order they were found in
        columns.setdefault(layer[key], []).append(key)
    placed: dict[str, Placed] = {}
    for col, keys in sorted(columns.items()):
        for row, key in enumerate(keys):
            placed[key] = Placed(
                lineage.nodes[key], PAD + col * (NODE_W + GAP_X), PAD + row * (NODE_H + GAP_Y)
            )
    edges = []
    for e in lineage.edges:
        a, b = placed[e.source], placed[e.target]
        x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
        x2, y2 = b.x, b.y + NODE_H // 2
        mid = (x1 + x2) // 2
        edges.append({"kind": e.kind, "path": f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"})
    width = PAD * 2 + (max(columns) + 1) * NODE_W + max(columns) * GAP_X
    height = PAD * 2 + max(len(k) for k in columns.values()) * (NODE_H + GAP_Y) - GAP_Y
    return {
        "width": width,
        "height": height,
        "node_w": NODE_W,
        "node_h": NODE_H,
        "nodes": list(placed.values()),
        "edges": edges,
    }
