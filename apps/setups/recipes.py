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
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.core.exceptions import ValidationError

from apps.audit import signing
from apps.audit.chain import canonical_json
from apps.deployments.models import KvCacheType, Preset
from apps.setups.models import SETUP_NAME, SETUP_SETTINGS, Experience, UseCase
from workers.hub import HubError, check_filename, check_repo_id, check_revision

SCHEMA_VERSION = 1
KIND = "aibox-recipe"
MAX_RECIPE_BYTES = 256 * 1024
MAX_NOTES_CHARS = 10_000
MAX_CHAT_TEMPLATE_CHARS = 100_000
# The deepest value a valid recipe holds is figures.N.hardware.gpus.N.name (six levels);
# anything far deeper is an attack on the parser's recursion, refused before it recurses.
MAX_DEPTH = 12

SIGNATURE_ALGORITHM = "ed25519"
BUILTIN_SIGNER = "builtin"
RECIPE_BOOK = Path(__file__).resolve().parent / "recipe_book"

# The adapter and its scale travel in the recipe's ``adapter`` section, as a file with
# its own sha256: an adapter's id on one box means nothing on another.
RECIPE_SETTINGS = tuple(name for name in SETUP_SETTINGS if name not in ("adapter", "adapter_scale"))
MODEL_KEYS = (
    "sha256",
    "file_name",
    "size_bytes",
    "architecture",
    "quantization",
    "parameter_count",
    "licence",
    "source",
)
ADAPTER_KEYS = (*MODEL_KEYS, "scale")
SOURCE_KEYS = ("hugging_face", "package")
HUGGING_FACE_KEYS = ("repo", "file", "revision")
PACKAGE_KEYS = ("name", "version")
FIGURE_VALUES = (
    "load_seconds",
    "prompt_tps_short",
    "prompt_tps_long",
    "decode_tps_single",
    "decode_tps_parallel",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "peak_ram_bytes",
    "peak_vram_bytes",
)
FIGURE_KEYS = ("measured_at", "hardware", *FIGURE_VALUES)
HARDWARE_KEYS = (
    "cpu_model",
    "cpu_cores",
    "ram_total_mib",
    "gpus",
    "llama_cpp_version",
    "hardware_class",
)
GPU_KEYS = ("name", "memory_total_mib")
DOCUMENT_KEYS = (
    "schema_version",
    "kind",
    "name",
    "use_case",
    "experience",
    "notes",
    "model",
    "adapter",
    "settings",
    "figures",
    "exported_at",
)
SIGNATURE_KEYS = ("algorithm", "public_key", "value")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A PyPI project name (PEP 508).
_PACKAGE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"

_FILE_HEADER = (
    f"# AIBox recipe, schema version {SCHEMA_VERSION} (docs/recipes.md).\n"
    "# The signature at the end covers every value above it: change one and the recipe\n"
    "# is refused. Comments and layout are not signed.\n"
)


class RecipeError(ValueError):
    """A recipe that cannot be read or written; ``field`` is the dotted path of the
    value at fault ("settings.context_length", "figures.0.hardware", "signature") or
    "file" for the file as a whole."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
        "model": _pick(model, MODEL_KEYS, "model"),
        "adapter": None if adapter is None else _pick(adapter, ADAPTER_KEYS, "adapter"),
        "settings": _pick(settings, RECIPE_SETTINGS, "settings", extra_ok=True),
        "figures": [_figure(figure, f"figures.{i}") for i, figure in enumerate(figures)],
        "exported_at": exported_at,
    }
    document = _plain(document, "")
    _check_document(document)
    return document


def recipe_dump(document: dict[str, Any]) -> bytes:
    """The recipe file: ``document`` as YAML, then ``signature`` by the box's key over
    ``canonical_json(document)``. Raises RecipeError if the document is not valid."""
    document = _plain(document, "")
    _check_document(document)
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
    _check_schema_version(top)
    signature = top.get("signature")
    if signature is None:
        raise RecipeError(
            "signature",
            "missing: this recipe is not signed, so nothing shows it is what its author exported",
        )
    document = _without_signature(top)
    fingerprint = _verify(signature, document)
    _check_document(document)
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
            _check_schema_version(top)
            if "signature" in top:
                raise RecipeError("signature", "built-in recipes are not signed")
            _check_document(top)
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
        raise RecipeError("file", f"a recipe is a YAML mapping of fields, not {_kind_of(top)}")
    _check_json_types(top, "")
    return top


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = exc.problem_mark or exc.context_mark
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        return f"{exc.problem}{line}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_json_types(value: Any, path: str) -> None:
    # YAML can also write binary, sets and non-string keys; none has one canonical JSON
    # form, so a recipe holding one could not be signed or verified.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecipeError(path or "file", f"the key {key!r} is not a string")
            _check_json_types(item, _join(path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_types(item, _join(path, str(i)))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise RecipeError(path, f"{value} is not a finite number")
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise RecipeError(path, f"{_kind_of(value)} is not allowed in a recipe")


def _check_schema_version(top: dict[str, Any]) -> None:
    version = top.get("schema_version")
    if version is None:
        raise RecipeError("schema_version", "missing: this is not an AIBox recipe")
    if type(version) is not int:
        raise RecipeError("schema_version", f"{version!r} is not a version number")
    if version != SCHEMA_VERSION:
        raise RecipeError(
            "schema_version",
            f"unknown schema version {version}; this AIBox reads version {SCHEMA_VERSION}",
        )


# Signing ------------------------------------------------------------------------------


def _signed_bytes(document: dict[str, Any]) -> bytes:
    return canonical_json(document).encode("utf-8")


def _without_signature(top: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in top.items() if key != "signature"}


def _verify(signature: Any, document: dict[str, Any]) -> str:
    """The signer's fingerprint, once ``signature`` is found to sign ``document``."""
    if not isinstance(signature, dict):
        raise RecipeError("signature", "must be a mapping of algorithm, public_key and value")
    _check_keys(signature, SIGNATURE_KEYS, "signature")
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


def _check_document(document: Any) -> None:
    if not isinstance(document, dict):
        raise RecipeError("file", "a recipe is a mapping of fields")
    _check_keys(document, DOCUMENT_KEYS, "")
    _check_schema_version(document)
    if document["kind"] != KIND:
        raise RecipeError("kind", f"{document['kind']!r} is not {KIND!r}")
    name = _string(document, "name", "", max_chars=100)
    try:
        SETUP_NAME(name)
    except ValidationError as exc:
        raise RecipeError("name", f"{name!r}: {' '.join(exc.messages)}") from None
    _choice(document, "use_case", "", UseCase.values)
    _choice(document, "experience", "", Experience.values)
    _string(document, "notes", "", max_chars=MAX_NOTES_CHARS, multiline=True, blank=True)
    _check_file(document["model"], "model", MODEL_KEYS)
    if document["adapter"] is not None:
        adapter = _check_file(document["adapter"], "adapter", ADAPTER_KEYS)
        _number(adapter, "scale", "adapter", low=0.0, high=4.0)
    _check_settings(document["settings"])
    figures = document["figures"]
    if not isinstance(figures, list):
        raise RecipeError("figures", f"must be a list, not {_kind_of(figures)}")
    for i, figure in enumerate(figures):
        _check_figure(figure, f"figures.{i}")
    _timestamp(document, "exported_at", "")


def _check_settings(settings: Any) -> None:
    settings = _mapping(settings, "settings", RECIPE_SETTINGS)
    _integer(settings, "context_length", "settings", low=128, high=1_048_576)
    _integer(settings, "parallel_slots", "settings", low=1, high=64)
    _integer(settings, "batch_size", "settings", low=8, high=8192)
    _integer(settings, "threads", "settings", low=1, high=256, null=True)
    _integer(settings, "gpu_layers", "settings", low=-1)
    _choice(settings, "kv_cache_type", "settings", KvCacheType.values)
    _boolean(settings, "flash_attention", "settings")
    _boolean(settings, "embeddings", "settings")
    _integer(settings, "stream_interval_ms", "settings", low=0, high=1000)
    _choice(settings, "preset", "settings", Preset.values)
    _string(
        settings,
        "chat_template",
        "settings",
        max_chars=MAX_CHAT_TEMPLATE_CHARS,
        multiline=True,
        blank=True,
    )


def _check_file(value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A model or adapter file: what it is (sha256, size) and where it comes from."""
    item = _mapping(value, path, keys)
    sha256 = _string(item, "sha256", path, max_chars=64)
    if not _SHA256.match(sha256):
        raise RecipeError(f"{path}.sha256", "must be 64 lowercase hexadecimal digits")
    file_name = _string(item, "file_name", path, max_chars=255)
    if "/" in file_name or "\\" in file_name or file_name in {".", ".."}:
        raise RecipeError(f"{path}.file_name", f"{file_name!r} must be a file name, not a path")
    _integer(item, "size_bytes", path, low=1)
    _string(item, "architecture", path, max_chars=64, blank=True)
    _string(item, "quantization", path, max_chars=32, blank=True)
    _integer(item, "parameter_count", path, low=1, null=True)
    _string(item, "licence", path, max_chars=100, blank=True)
    source = _mapping(item["source"], f"{path}.source", SOURCE_KEYS)
    hub_path = f"{path}.source.hugging_face"
    if source["hugging_face"] is not None:
        hub = _mapping(source["hugging_face"], hub_path, HUGGING_FACE_KEYS)
        for key, check in (
            ("repo", check_repo_id),
            ("file", check_filename),
            ("revision", check_revision),
        ):
            _hub_value(hub, key, hub_path, check)
    package_path = f"{path}.source.package"
    if source["package"] is not None:
        package = _mapping(source["package"], package_path, PACKAGE_KEYS)
        name = _string(package, "name", package_path, max_chars=200)
        if not _PACKAGE_NAME.match(name):
            raise RecipeError(f"{package_path}.name", f"{name!r} is not a Python package name")
        _string(package, "version", package_path, max_chars=64)
    return item


def _hub_value(hub: dict[str, Any], key: str, path: str, check: Callable[[str], str]) -> None:
    value = _string(hub, key, path, max_chars=1000)
    try:
        cleaned = check(value)
    except HubError as exc:
        raise RecipeError(f"{path}.{key}", str(exc)) from None
    if cleaned != value:
        raise RecipeError(f"{path}.{key}", f"{value!r} has spaces around it")


def _check_figure(value: Any, path: str) -> None:
    figure = _mapping(value, path, FIGURE_KEYS)
    _timestamp(figure, "measured_at", path)
    hardware = _mapping(figure["hardware"], f"{path}.hardware", HARDWARE_KEYS)
    hardware_path = f"{path}.hardware"
    _string(hardware, "cpu_model", hardware_path, max_chars=200, blank=True)
    _integer(hardware, "cpu_cores", hardware_path, low=1, null=True)
    _integer(hardware, "ram_total_mib", hardware_path, low=0, null=True)
    gpus = hardware["gpus"]
    if not isinstance(gpus, list):
        raise RecipeError(f"{hardware_path}.gpus", f"must be a list, not {_kind_of(gpus)}")
    for i, gpu in enumerate(gpus):
        gpu_path = f"{hardware_path}.gpus.{i}"
        gpu = _mapping(gpu, gpu_path, GPU_KEYS)
        _string(gpu, "name", gpu_path, max_chars=200, blank=True)
        _integer(gpu, "memory_total_mib", gpu_path, low=0, null=True)
    _string(hardware, "llama_cpp_version", hardware_path, max_chars=100, blank=True)
    _string(hardware, "hardware_class", hardware_path, max_chars=200, blank=True)
    for key in FIGURE_VALUES:
        if key.endswith("_bytes"):
            _integer(figure, key, path, low=0, null=True)
        else:
            _number(figure, key, path, low=0.0, null=True)


# Small checks, each naming the field it refuses ----------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    names.update({list: "a list", dict: "a mapping"})
    return names.get(type(value), f"a {type(value).__name__} value")


def _check_keys(value: dict[str, Any], keys: tuple[str, ...], path: str) -> None:
    unknown = [key for key in value if key not in keys]
    if unknown:
        raise RecipeError(
            _join(path, str(unknown[0])),
            f"unknown field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(key) for key in unknown)}"
            f"{' in ' + path if path else ''}; expected only {', '.join(keys)}",
        )
    missing = [key for key in keys if key not in value]
    if missing:
        raise RecipeError(_join(path, missing[0]), "missing")


def _mapping(value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(path, f"must be a mapping of {', '.join(keys)}, not {_kind_of(value)}")
    _check_keys(value, keys, path)
    return value


def _string(
    item: dict[str, Any],
    key: str,
    path: str,
    *,
    max_chars: int,
    multiline: bool = False,
    blank: bool = False,
) -> str:
    field = _join(path, key)
    value = item[key]
    if not isinstance(value, str):
        raise RecipeError(field, f"must be text, not {_kind_of(value)}")
    if not blank and not value.strip():
        raise RecipeError(field, "must not be empty")
    if len(value) > max_chars:
        raise RecipeError(field, f"is {len(value)} characters; at most {max_chars}")
    if "\x00" in value or (not multiline and _CONTROL.search(value)):
        raise RecipeError(field, "must not contain control characters")
    return value


def _choice(item: dict[str, Any], key: str, path: str, choices: list[str]) -> None:
    value = item[key]
    if not isinstance(value, str) or value not in choices:
        raise RecipeError(_join(path, key), f"{value!r} is not one of {', '.join(choices)}")


def _boolean(item: dict[str, Any], key: str, path: str) -> None:
    if not isinstance(item[key], bool):
        raise RecipeError(_join(path, key), f"must be true or false, not {item[key]!r}")


def _integer(
    item: dict[str, Any],
    key: str,
    path: str,
    *,
    low: int,
    high: int | None = None,
    null: bool = False,
) -> None:
    field = _join(path, key)
    value = item[key]
    if value is None and null:
        return
    # bool is an int in Python; "true" is not a number of slots.
    if type(value) is not int:
        raise RecipeError(
            field, f"must be a whole number{' or null' if null else ''}, not {value!r}"
        )
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise RecipeError(field, f"{value} is out of range: it must be {bounds}")


def _number(
    item: dict[str, Any],
    key: str,
    path: str,
    *,
    low: float,
    high: float | None = None,
    null: bool = False,
) -> None:
    field = _join(path, key)
    value = item[key]
    if value is None and null:
        return
    if type(value) not in (int, float) or not math.isfinite(value):
        raise RecipeError(field, f"must be a number{' or null' if null else ''}, not {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise RecipeError(field, f"{value} is out of range: it must be {bounds}")


def _timestamp(item: dict[str, Any], key: str, path: str) -> None:
    field = _join(path, key)
    value = _string(item, key, path, max_chars=64)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RecipeError(field, f"{value!r} is not an ISO 8601 date and time") from None
    if moment.tzinfo is None:
        raise RecipeError(field, f"{value!r} needs a UTC offset, e.g. +00:00")


# Building a document ------------------------------------------------------------------


def _pick(
    value: Mapping[str, Any], keys: tuple[str, ...], path: str, *, extra_ok: bool = False
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise RecipeError(path, f"must be a mapping of {', '.join(keys)}")
    if not extra_ok:
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise RecipeError(_join(path, unknown[0]), "not a recipe field")
    missing = [key for key in keys if key not in value]
    if missing:
        raise RecipeError(_join(path, missing[0]), "missing")
    return {key: value[key] for key in keys}


def _figure(figure: Mapping[str, Any], path: str) -> dict[str, Any]:
    if not isinstance(figure, Mapping):
        raise RecipeError(path, "must be a mapping of measured_at, hardware and the figures")
    hardware = figure.get("hardware") or {}
    if not isinstance(hardware, Mapping):
        raise RecipeError(f"{path}.hardware", "must be a mapping")
    gpus = hardware.get("gpus") or []
    if not all(isinstance(gpu, Mapping) for gpu in gpus):
        raise RecipeError(f"{path}.hardware.gpus", "must be a list of mappings")
    return {
        "measured_at": figure.get("measured_at"),
        "hardware": {
            "cpu_model": hardware.get("cpu_model", ""),
            "cpu_cores": hardware.get("cpu_cores"),
            "ram_total_mib": hardware.get("ram_total_mib"),
            "gpus": [
                {"name": gpu.get("name", ""), "memory_total_mib": gpu.get("memory_total_mib")}
                for gpu in gpus
            ],
            "llama_cpp_version": hardware.get("llama_cpp_version", ""),
            "hardware_class": hardware.get("hardware_class", ""),
        },
        **{key: figure.get(key) for key in FIGURE_VALUES},
    }


def _plain(value: Any, path: str) -> Any:
    """``value`` as plain JSON types: a TextChoices member becomes its str, a tuple a
    list (YAML's safe dumper writes neither)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item, _join(path, str(key))) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, _join(path, str(i))) for i, item in enumerate(value)]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise RecipeError(path or "file", f"{_kind_of(value)} cannot be written into a recipe")
