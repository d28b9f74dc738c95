"""Links from audit events to what they describe, when it still exists.

An event copies its target's type, id and label, so it outlives the target; the page
links a row only when the object is still there and the viewer may open its page. One
query per target type on the page, never one per row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from django.apps import apps
from django.db import models
from django.urls import reverse

from apps.accounts.models import Role, User
from apps.audit.models import AuditEvent


def _by_name(url_name: str) -> Callable[[models.Model], str]:
    return lambda obj: reverse(url_name, args=[obj.name])


def _by_pk(url_name: str) -> Callable[[models.Model], str]:
    return lambda obj: reverse(url_name, args=[obj.pk])


# target_type → (how to build the URL when the model has no get_absolute_url, roles
# that may open it; empty: every role that can read the audit log).
_LINKS: dict[str, tuple[Callable[[models.Model], str] | None, tuple[Role, ...]]] = {
    "registry.modelrepo": (_by_name("registry:repo"), ()),
    "registry.modelversion": (None, ()),
    "registry.modelimport": (None, ()),
    "datasets.dataset": (_by_name("datasets:detail"), ()),
    "datasets.datasetversion": (None, ()),
    "datasets.datasetimport": (None, ()),
    "deployments.deployment": (_by_name("deployments:detail"), ()),
    "finetune.finetunejob": (_by_pk("finetune:job"), ()),
    "accounts.user": (_by_pk("accounts:user_edit"), (Role.ADMIN,)),
    "accounts.apikey": (lambda obj: reverse("accounts:api_keys"), (Role.ADMIN,)),
}


def target_links(events: Iterable[AuditEvent], *, viewer: User) -> dict[int, str]:
    """``{event seq: url}`` for the events whose target still exists and can be opened."""
    wanted: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for event in events:
        if event.target_type in _LINKS and event.target_id:
            wanted[event.target_type][event.target_id].append(event.seq)
    links: dict[int, str] = {}
    for target_type, by_id in wanted.items():
        build, roles = _LINKS[target_type]
        if roles and not viewer.has_role(*roles):
            continue
        model = apps.get_model(target_type)
        pk_field = model._meta.pk
        ids = []
        for raw in by_id:
            try:
                ids.append(pk_field.to_python(raw))
            except Exception:  # noqa: BLE001, S112 - an id that is not a key links nowhere
                continue
        for pk, obj in model._default_manager.in_bulk(ids).items():
            url = build(obj) if build is not None else obj.get_absolute_url()
            for seq in by_id.get(str(pk), ()):
                links[seq] = url
    return links
