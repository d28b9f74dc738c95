"""Recipes: a setup written out as a signed YAML file, to share between boxes.

A recipe names its model by sha256 (and says where the file can be obtained), carries
every runtime setting of the setup, the figures measured with it (each with the hardware
it ran on) and the notes on why. docs/recipes.md describes the format field by field;
this module is its only reader and writer. It touches no database: callers turn setups
and trials into plain dicts and back.

The signature is Ed25519, by the box's audit key, over ``canonical_json(document)`` (the
document is everything in the file except ``signature``). It covers the parsed values,
not the YAML text, so comments and layout may change without breaking it, but any value
may not. Whether the signer is *trusted* is a separate question, answered by the
caller's list of key fingerprints: an unknown signer is reported, never refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from apps.audit import signing
from apps.audit.chain import canonical_json
from apps.setups.models import SETUP_SETTINGS
from apps.setups.recipe_format import (
    ADAPTER_KEYS,
    KIND,
    MAX_DEPTH,
    MAX_RECIPE_BYTES,
    MODEL_KEYS,
    RECIPE_SETTINGS,
    SCHEMA_VERSION,
    SIGNATURE_KEYS,
    RecipeError,
    document_check,
    fields_pick,
    figure_fields,
    json_types_check,
    keys_check,
    kind_of,
    plain_values,
    schema_version_check,
)

SIGNATURE_ALGORITHM = "ed25519"
BUILTIN_SIGNER = "builtin"
RECIPE_BOOK = Path(__file__).resolve().parent / "recipe_book"

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"

_FILE_HEADER = (
    f"# AIBox recipe, schema version {SCHEMA_VERSION} (docs/recipes.md).\n"
    "# The signature at the end covers every value above it: change one and the recipe\n"
    "# is refused. Comments and layout are not signed.\n"
)


@dataclass(frozen=True)
class Recipe:
    """A recipe read and checked: ``document`` without its signature, who signed it
    (a key fingerprint, or "builtin") and whether the box trusts that signer."""

    document: dict[str, Any]
    signer_fingerprint: str
    trusted: bool

    @property
    def builtin(self) -> bool:
        return self.signer_fingerprint == BUILTIN_SIGNER


# Writing ------------------------------------------------------------------------------


def recipe_source(*, source_kind: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's ``source`` for a registry version's ``source_kind`` and ``source``
    (ModelVersion.source): where another box can get the same file. Uploads, server
    paths and fine-tunes give nothing another box can fetch; their source is all null
    and the sha256 alone says which file to bring."""
    hugging_face = None
    package = None
    if source_kind == "hugging_face" and source.get("repo_id") and source.get("filename"):
        # The commit the import resolved to, not the branch asked for: a branch moves.
        revision = source.get("commit") or source.get("revision") or "main"
        hugging_face = {
            "repo": str(source["repo_id"]),
            "file": str(source["filename"]),
            "revision": str(revision),
        }
    elif source_kind == "bundled" and source.get("package"):
        package = {
            "name": str(source["package"]),
            "version": str(source.get("package_version") or ""),
        }
    return {"hugging_face": hugging_face, "package": package}


def recipe_document(
    *,
    name: str,
    notes: str,
    use_case: str,
    experience: str,
    model: Mapping[str, Any],
    adapter: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
    figures: list[Mapping[str, Any]],
    exported_at: str,
) -> dict[str, Any]:
    """The unsigned recipe document, keys in the documented order, checked as a reader
    would check it (a box never writes a recipe that it would refuse to read).

    ``model`` has MODEL_KEYS (``source`` as ``recipe_source`` makes it); ``adapter`` the
    same plus ``scale``, or None. ``settings`` has every RECIPE_SETTINGS; the setup's
    ``adapter`` and ``adapter_scale`` may be there too (``Setup.settings_dict()``) and are
    left out. Each figure is one trial: ``measured_at`` (ISO 8601), ``hardware`` (the
    trial's hardware dict plus ``hardware_class``) and the FIGURE_VALUES, a missing one
    null. Of the hardware only HARDWARE_KEYS are kept (and of each GPU its name and
    memory): a host name or free memory at the time says nothing to another box.
    ``exported_at`` is an ISO 8601 time with its offset (``chain.format_timestamp``).
    Raises RecipeError naming the field at fault.
    """
    unknown = sorted(set(settings) - set(SETUP_SETTINGS))
    if unknown:
        raise RecipeError(f"settings.{unknown[0]}", "not a setup setting")
    document = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "name": name,
        "use_case": use_case,
        "experience": experience,
        "notes": notes,
        "model": fields_pick(model, MODEL_KEYS, "model"),
        "adapter": None if adapter is None else fields_pick(adapter, ADAPTER_KEYS, "adapter"),
        "settings": fields_pick(settings, RECIPE_SETTINGS, "settings", extra_ok=True),
        "figures": [figure_fields(figure, f"figures.{i}") for i, figure in enumerate(figures)],
        "exported_at": exported_at,
    }
    document = plain_values(document, "")
    document_check(document)
    return document


def recipe_dump(document: dict[str, Any]) -> bytes:
    """The recipe file: ``document`` as YAML, then ``signature`` by the box's key over
    ``canonical_json(document)``. Raises RecipeError if the document is not valid."""
    document = plain_values(document, "")
    document_check(document)
    key = signing.public_key()
    signature = {
        "algorithm": SIGNATURE_ALGORITHM,
        "public_key": key.base64,
        "value": signing.sign(_signed_bytes(document)),
    }
    text = yaml.dump(
        {**document, "signature": signature},
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=88,
    )
    data = (_FILE_HEADER + text).encode("utf-8")
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(
            "file",
            f"the recipe would be {len(data)} bytes; a recipe is at most {MAX_RECIPE_BYTES} "
            "(fewer figures make it smaller)",
        )
    # The signature covers values as a reader parses them back; a string YAML cannot
    # carry exactly would make a file that no box accepts, so find out here.
    if _signed_bytes(_without_signature(_parse(data))) != _signed_bytes(document):
        raise RecipeError("file", "the recipe does not read back as written")
    return data


# Reading ------------------------------------------------------------------------------


def recipe_load(data: bytes, *, trusted_keys: Iterable[str]) -> Recipe:
    """Read a recipe file: parse it safely, check its schema version, verify its
    signature, then check every field. ``trusted_keys`` are the fingerprints (sha256 hex
    of the raw public key) of the signers this box trusts; a valid signature by another
    key is accepted with ``trusted=False``. Raises RecipeError naming the field at fault.
    """
    if isinstance(trusted_keys, str):
        # One fingerprint passed bare would be read as 64 one-character keys.
        raise TypeError("trusted_keys is a collection of fingerprints, not one string")
    top = _parse(data)
    schema_version_check(top)
    signature = top.get("signature")
    if signature is None:
        raise RecipeError(
            "signature",
            "missing: this recipe is not signed, so nothing shows it is what its author exported",
        )
    document = _without_signature(top)
    fingerprint = _verify(signature, document)
    document_check(document)
    trusted = fingerprint in {key.strip().lower() for key in trusted_keys}
    return Recipe(document=document, signer_fingerprint=fingerprint, trusted=trusted)


def builtin_recipes() -> list[Recipe]:
    """The recipes that ship with AIBox (``recipe_book/*.yaml``), by file name. They are
    part of the code, so unsigned and trusted; each is checked like any recipe, and one
    that fails raises RecipeError with its file name in the message."""
    recipes: list[Recipe] = []
    names: set[str] = set()
    for path in sorted(RECIPE_BOOK.glob("*.yaml")):
        try:
            top = _parse(path.read_bytes())
            schema_version_check(top)
            if "signature" in top:
                raise RecipeError("signature", "built-in recipes are not signed")
            document_check(top)
            if top["name"] in names:
                raise RecipeError("name", f"{top['name']!r} is the name of another built-in")
        except RecipeError as exc:
            raise RecipeError(exc.field, f"{path.name}: {exc.message}") from exc
        names.add(top["name"])
        recipes.append(Recipe(document=top, signer_fingerprint=BUILTIN_SIGNER, trusted=True))
    return recipes


# YAML ---------------------------------------------------------------------------------


class _NotAllowed(yaml.composer.ComposerError):
    """Valid YAML that a recipe may not use."""


class _Loader(yaml.SafeLoader):
    """SafeLoader without anchors or aliases (an alias bomb never expands), without
    nesting deeper than MAX_DEPTH, and reading timestamps as the strings they are
    written as (a recipe holds only what JSON can, so the signature is well defined)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _NotAllowed(
                None,
                None,
                "anchors and aliases (& and *) are not allowed in a recipe",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _NotAllowed(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # A chat template or notes over several lines read best as a literal block; YAML
    # would turn a carriage return into a line feed there, so those keep quotes.
    style = "|" if "\n" in value and "\r" not in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _parse(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(
            "file",
            f"the file is {len(data)} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes",
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError("file", f"not UTF-8 text (byte {exc.start})") from None
    try:
        top = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _NotAllowed as exc:
        raise RecipeError("file", _yaml_problem(exc)) from None
    except yaml.YAMLError as exc:
        raise RecipeError("file", f"not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(top, dict):
        raise RecipeError("file", f"a recipe is a YAML mapping of fields, not {kind_of(top)}")
    json_types_check(top, "")
    return top


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = exc.problem_mark or exc.context_mark
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        return f"{exc.problem}{line}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# Signing ------------------------------------------------------------------------------


def _signed_bytes(document: dict[str, Any]) -> bytes:
    return canonical_json(document).encode("utf-8")


def _without_signature(top: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in top.items() if key != "signature"}


def _verify(signature: Any, document: dict[str, Any]) -> str:
    """The signer's fingerprint, once ``signature`` is found to sign ``document``."""
    if not isinstance(signature, dict):
        raise RecipeError("signature", "must be a mapping of algorithm, public_key and value")
    keys_check(signature, SIGNATURE_KEYS, "signature")
    if signature["algorithm"] != SIGNATURE_ALGORITHM:
        raise RecipeError(
            "signature.algorithm",
            f"{signature['algorithm']!r} is not supported; recipes are signed with "
            f"{SIGNATURE_ALGORITHM}",
        )
    raw_key = _base64(signature["public_key"], "signature.public_key", 32)
    raw_signature = _base64(signature["value"], "signature.value", 64)
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_signature, _signed_bytes(document))
    except (InvalidSignature, ValueError):
        raise RecipeError(
            "signature",
            "does not match the recipe: it was modified or damaged after it was signed, "
            "so it is refused",
        ) from None
    return hashlib.sha256(raw_key).hexdigest()


def _base64(value: Any, field: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise RecipeError(field, "must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RecipeError(field, "is not valid base64") from None
    if len(raw) != size:
        raise RecipeError(field, f"must be {size} bytes; it is {len(raw)}")
    return raw


# Field checks -------------------------------------------------------------------------
