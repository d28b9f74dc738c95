"""The recipe format (docs/recipes.md): its fields, and the checks a recipe's values
pass before anything else reads them. Each check raises RecipeError with the dotted path
of the value at fault, so a refused recipe says exactly what to fix.

Over 400 lines because it is the format itself: one check per field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError

from apps.deployments.models import (
    KvCacheType,
    Preset,
    ServingMode,
    SplitMode,
    tensor_split_parse,
)
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


# The adapter and its scale travel in the recipe's ``adapter`` section, as a file with
# its own sha256: an adapter's id on one box means nothing on another.
RECIPE_SETTINGS = tuple(name for name in SETUP_SETTINGS if name not in ("adapter", "adapter_scale"))
# Settings added after the first recipes were shared: a recipe without one gets the
# setting's default (the behaviour those recipes were measured with).
RECIPE_SETTINGS_ADDED = ("serving_mode", "split_mode", "tensor_split")
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


class RecipeError(ValueError):
    """A recipe that cannot be read or written; ``field`` is the dotted path of the
    value at fault ("settings.context_length", "figures.0.hardware", "signature") or
    "file" for the file as a whole."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def json_types_check(value: Any, path: str) -> None:
    # YAML can also write binary, sets and non-string keys; none has one canonical JSON
    # form, so a recipe holding one could not be signed or verified.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecipeError(path or "file", f"the key {key!r} is not a string")
            json_types_check(item, _join(path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            json_types_check(item, _join(path, str(i)))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise RecipeError(path, f"{value} is not a finite number")
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise RecipeError(path, f"{kind_of(value)} is not allowed in a recipe")


def schema_version_check(top: dict[str, Any]) -> None:
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


def document_check(document: Any) -> None:
    if not isinstance(document, dict):
        raise RecipeError("file", "a recipe is a mapping of fields")
    keys_check(document, DOCUMENT_KEYS, "")
    schema_version_check(document)
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
        raise RecipeError("figures", f"must be a list, not {kind_of(figures)}")
    for i, figure in enumerate(figures):
        _check_figure(figure, f"figures.{i}")
    _timestamp(document, "exported_at", "")


def _check_settings(settings: Any) -> None:
    settings = _mapping(settings, "settings", RECIPE_SETTINGS, optional=RECIPE_SETTINGS_ADDED)
    _integer(settings, "context_length", "settings", low=128, high=1_048_576)
    _integer(settings, "parallel_slots", "settings", low=1, high=64)
    _integer(settings, "batch_size", "settings", low=8, high=8192)
    _integer(settings, "threads", "settings", low=1, high=256, null=True)
    _integer(settings, "gpu_layers", "settings", low=-1)
    if "split_mode" in settings:
        _choice(settings, "split_mode", "settings", SplitMode.values)
    if "tensor_split" in settings:
        _tensor_split(settings)
    _choice(settings, "kv_cache_type", "settings", KvCacheType.values)
    _boolean(settings, "flash_attention", "settings")
    if "serving_mode" in settings:
        _choice(settings, "serving_mode", "settings", ServingMode.values)
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


def _tensor_split(settings: dict[str, Any]) -> None:
    """Proportions per GPU ("3,1"), only with a split over the GPUs, as a setup takes them."""
    split = _string(settings, "tensor_split", "settings", max_chars=200, blank=True)
    try:
        tensor_split_parse(split)
    except ValidationError as exc:
        raise RecipeError("settings.tensor_split", exc.messages[0]) from None
    if split.strip() and settings.get("split_mode", SplitMode.NONE) == SplitMode.NONE:
        raise RecipeError(
            "settings.tensor_split", "proportions need split_mode layer or row, not none"
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
        raise RecipeError(f"{hardware_path}.gpus", f"must be a list, not {kind_of(gpus)}")
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


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    names.update({list: "a list", dict: "a mapping"})
    return names.get(type(value), f"a {type(value).__name__} value")


def keys_check(
    value: dict[str, Any], keys: tuple[str, ...], path: str, optional: tuple[str, ...] = ()
) -> None:
    unknown = [key for key in value if key not in keys]
    if unknown:
        raise RecipeError(
            _join(path, str(unknown[0])),
            f"unknown field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(key) for key in unknown)}"
            f"{' in ' + path if path else ''}; expected only {', '.join(keys)}",
        )
    missing = [key for key in keys if key not in value and key not in optional]
    if missing:
        raise RecipeError(_join(path, missing[0]), "missing")


def _mapping(
    value: Any, path: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(path, f"must be a mapping of {', '.join(keys)}, not {kind_of(value)}")
    keys_check(value, keys, path, optional)
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
        raise RecipeError(field, f"must be text, not {kind_of(value)}")
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


def fields_pick(
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


def figure_fields(figure: Mapping[str, Any], path: str) -> dict[str, Any]:
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


def plain_values(value: Any, path: str) -> Any:
    """``value`` as plain JSON types: a TextChoices member becomes its str, a tuple a
    list (YAML's safe dumper writes neither)."""
    if isinstance(value, Mapping):
        return {str(key): plain_values(item, _join(path, str(key))) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(item, _join(path, str(i))) for i, item in enumerate(value)]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise RecipeError(path or "file", f"{kind_of(value)} cannot be written into a recipe")
