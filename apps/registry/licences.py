"""Licences as SPDX expressions: how a derived version's licence is worked out, and
whether a licence may be deployed.

The rule, in one place: a version is bound by its repo's licence AND the licence of
every parent version AND the licence of every dataset a fine-tune trained it on, so a
LoRA adapter of Gemma trained on CC-BY-4.0 data is ``gemma AND cc-by-4.0``. Named
licences that SPDX does not list (``gemma``) are kept as they are written; the
CycloneDX export writes them as ``LicenseRef-…``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from license_expression import ExpressionError, Licensing

if TYPE_CHECKING:
    from apps.registry.models import ModelVersion

_licensing = Licensing()

# The data a version was fine-tuned on is the fine-tune app's to know, and that app sits
# above the registry (docs/architecture.md, Layers), so it passes down how to read those
# licences when Django starts (``FinetuneConfig.ready``).
TrainingLicences = Callable[["ModelVersion"], list[str]]
_training_licences: TrainingLicences | None = None


def training_licences_source(reader: TrainingLicences) -> None:
    """Set how ``version_licence`` reads the licences of the data a version was trained
    on."""
    global _training_licences
    _training_licences = reader


def licence_check(expression: str) -> str:
    """The cleaned licence of a repo or dataset, refused when it is not a licence id or an
    SPDX expression of them (``apache-2.0``, ``gemma``, ``mit OR apache-2.0``)."""
    expression = " ".join(expression.split())
    if not expression:
        raise ValidationError("Give the licence: an SPDX id (apache-2.0, mit…) or a name (gemma).")
    try:
        _licensing.parse(expression, validate=False, strict=True)
    except ExpressionError as exc:
        raise ValidationError(
            f"{expression!r} is not a licence id or an SPDX licence expression: {exc}"
        ) from exc
    return expression


def _parts(expression: str) -> list:
    try:
        parsed = _licensing.parse(expression)
    except ExpressionError:
        # A licence written before names were checked: one term, as it is.
        parsed = _licensing.parse(_as_symbol(expression))
    if parsed is None:
        return []
    return list(parsed.args) if isinstance(parsed, _licensing.AND) else [parsed]


def _as_symbol(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text.strip()).strip("-") or "unknown"


def licence_and(expressions: Iterable[str]) -> str:
    """All of ``expressions`` joined with AND, each term once, in the order given."""
    parts: list = []
    for expression in expressions:
        if not expression or not expression.strip():
            continue
        for part in _parts(expression):
            if part not in parts:
                parts.append(part)
    if not parts:
        return ""
    return str(parts[0]) if len(parts) == 1 else str(_licensing.AND(*parts))


def licence_terms(expression: str) -> list[str]:
    """Every licence named in ``expression`` (``mit OR apache-2.0`` names two)."""
    keys: list[str] = []
    for part in _parts(expression):
        for key in _licensing.license_keys(part):
            if key not in keys:
                keys.append(key)
    return keys


def version_licence(version: ModelVersion) -> str:
    """The licence a version is bound by (see the module's docstring): its repo's, its
    parents' (recursively) and its fine-tune's datasets'."""
    training_licences = _training_licences
    if training_licences is None:
        raise ImproperlyConfigured(
            "A version's licence needs its training data's: apps.finetune, which sets "
            "apps.registry.licences.training_licences_source, is not installed."
        )
    seen: set[int] = set()
    ordered: list[str] = []

    def visit(v: ModelVersion) -> None:
        if v.pk in seen:
            return
        seen.add(v.pk)
        ordered.append(v.repo.licence)
        for parent in v.parents.select_related("repo"):
            visit(parent)
        ordered.extend(training_licences(v))

    visit(version)
    return licence_and(ordered)


def licence_allowlist() -> list[str]:
    return [x.strip().lower() for x in settings.DEPLOY_LICENCE_ALLOWLIST if x.strip()]


def licence_not_allowed(expression: str) -> list[str]:
    """The terms of ``expression`` that AIBOX_DEPLOY_LICENCE_ALLOWLIST does not list."""
    allowed = set(licence_allowlist())
    return [t for t in licence_terms(expression) if t.lower() not in allowed]


def spdx_for_cyclonedx(expression: str) -> dict | None:
    """One CycloneDX ``licenses`` entry: an SPDX id, a named licence, or an expression
    in which names SPDX does not list become ``LicenseRef-<name>``."""
    from cyclonedx.spdx import fixup_id

    text = licence_and([expression])
    if not text:
        return None
    terms = licence_terms(text)
    if terms == [text]:  # one licence
        spdx_id = fixup_id(text)
        return {"license": {"id": spdx_id} if spdx_id else {"name": text}}
    for key in sorted(terms, key=len, reverse=True):
        new = fixup_id(key) or (
            key if key.startswith("LicenseRef-") else f"LicenseRef-{_as_symbol(key)}"
        )
        text = re.sub(rf"(?<![\w.+-]){re.escape(key)}(?![\w.+-])", new, text)
    return {"expression": text}
