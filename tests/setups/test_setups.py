"""Setups against the live stack: the advisor on this machine, trials measured by the real
runtime on a real worker, one-call deploys, and recipes exported and imported."""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest
import redis
import yaml
from django.conf import settings

from apps.accounts.models import Role
from apps.audit import signing
from apps.audit.chain import canonical_json
from apps.audit.models import AuditEvent
from apps.audit.signing import create_key
from apps.deployments import services as deployment_services
from apps.deployments.models import Deployment, State
from apps.registry.models import ModelVersion
from apps.registry.services import model_repo_create, model_version_approve, model_version_deprecate
from apps.setups import recipes, services
from apps.setups.models import Experience, Origin, Setup, Trial, TrialState, UseCase
from tests.conftest import client_for, make_user
from tests.live import wait_for_state, wait_until
from tests.registry.conftest import upload_version
from tests.setups.conftest import write_shaped_gguf
from workers import redis_keys

CHAT_USE_CASES = [u for u in UseCase if u != UseCase.SEARCH]


def _advise(client, **body):
    return client.post("/api/v1/setups/advise", body, content_type="application/json")


def _candidate(answer: dict, version) -> dict:
    return next(c for c in answer["candidates"] if c["model_version"] == version.pk)


def _wait_for_trial(trial_id: int, timeout: float = 180) -> Trial:
    def finished():
        trial = Trial.objects.get(pk=trial_id)
        return trial if trial.state in (TrialState.SUCCEEDED, TrialState.FAILED) else None

    return wait_until(finished, what=f"trial {trial_id} finishing", timeout=timeout)


@pytest.mark.parametrize("experience", list(Experience))
@pytest.mark.parametrize("use_case", CHAT_USE_CASES)
def test_the_advisor_proposes_the_bundled_model_with_reasons_and_fit(stack, use_case, experience):
    answer = _advise(client_for(stack.admin), use_case=use_case, experience=experience)
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert stack.worker in body["workers"]
    gemma = _candidate(body, stack.version)
    assert gemma["suitable"] and gemma["fits_somewhere"], gemma["why_not"]
    assert gemma["rank"] == 1
    fit = next(f for f in gemma["fits"] if f["worker"] == stack.worker)
    assert 0 < fit["needed_bytes"] < fit["free_bytes"]
    # Every setting the advisor chose comes with its reason in plain words.
    reasons = " ".join(gemma["reasons"])
    assert f"{gemma['settings']['context_length']:,} tokens of context" in reasons
    assert gemma["settings"]["preset"] in reasons
    assert f"KV cache {gemma['settings']['kv_cache_type']}" in reasons
    assert gemma["expected"]["decode_tps"] > 0
    assert gemma["expected"]["basis"] in ("measured", "scaled", "estimate")


def test_the_experience_changes_the_settings(stack):
    client = client_for(stack.admin)
    fast = _candidate(_advise(client, use_case="chat", experience="fast").json(), stack.version)
    creative = _candidate(
        _advise(client, use_case="chat", experience="creative").json(), stack.version
    )
    long_docs = _candidate(
        _advise(client, use_case="long_documents", experience="quality").json(), stack.version
    )
    assert fast["settings"]["parallel_slots"] > creative["settings"]["parallel_slots"]
    assert creative["settings"]["preset"] == "creative"
    assert "temperature 1.0" in " ".join(creative["reasons"])
    # Gemma 3 270M takes 32k tokens: long documents get all of it, with q8_0 to fit.
    assert long_docs["settings"]["context_length"] == 32_768
    assert long_docs["settings"]["kv_cache_type"] == "q8_0"
    assert "so each has room" in " ".join(long_docs["reasons"])


def test_a_generation_model_is_not_proposed_for_search(stack):
    body = _advise(client_for(stack.admin), use_case="search", experience="fast").json()
    gemma = _candidate(body, stack.version)
    assert not gemma["suitable"]
    assert "not an embedding model" in " ".join(gemma["why_not"])


def test_a_model_the_workers_cannot_hold_is_listed_with_the_numbers(stack, huge_version):
    body = _advise(client_for(stack.admin), use_case="chat", experience="quality").json()
    huge = _candidate(body, huge_version)
    assert not huge["fits_somewhere"]
    assert huge["rank"] > _candidate(body, stack.version)["rank"]
    # (It has no chat template either; that reason comes first.)
    why = huge["why_not"][-1]
    needed = next(f for f in huge["fits"] if f["worker"] == stack.worker)["needed_bytes"]
    assert f"needs about {needed / 2**20:,.0f} MiB" in why
    assert "has" in why and "MiB free" in why
    # Asked to deploy it anyway, the box refuses with the same reason and creates nothing.
    answer = client_for(stack.admin).post(
        "/api/v1/setups/advise/apply",
        {
            "use_case": "chat",
            "experience": "quality",
            "model_version": huge_version.pk,
            "action": "deploy",
        },
        content_type="application/json",
    )
    assert answer.status_code == 400
    assert "MiB free" in answer.json()["model_version"][0]
    assert not Setup.objects.filter(model_version=huge_version).exists()


def test_a_trial_measures_the_setup_and_the_advisor_then_quotes_it(stack):
    admin = client_for(stack.admin)
    answer = admin.post(
        "/api/v1/setups/advise/apply",
        {
            "use_case": "extraction",
            "experience": "quality",
            "model_version": stack.version.pk,
            "action": "trial",
        },
        content_type="application/json",
    )
    assert answer.status_code == 201, answer.content
    setup = Setup.objects.get(name=answer.json()["setup"]["name"])
    assert setup.origin == Origin.ADVISOR and "Proposed by the advisor" in setup.notes
    trial = _wait_for_trial(answer.json()["trial"]["id"])
    assert trial.state == TrialState.SUCCEEDED, trial.reason
    assert trial.worker == stack.worker
    for figure in services.TRIAL_FIGURES:
        if figure == "peak_vram_bytes":
            continue
        assert getattr(trial, figure) > 0, figure
    assert trial.peak_vram_bytes is None  # no GPU here
    assert trial.hardware["llama_cpp_version"] and trial.hardware_class.startswith("cpu:")
    assert AuditEvent.objects.filter(action="trial.succeeded", target_id=str(setup.pk)).exists()

    # The setup's page shows the figures, and the comparison API returns them.
    page = admin.get(f"/setups/{setup.name}/")
    assert f"{trial.decode_tps_single:.1f}" in page.content.decode()
    listed = admin.get("/api/v1/setups/trials/", {"setup": setup.name}).json()
    assert listed[0]["decode_tps_single"] == trial.decode_tps_single

    # Asked again, the advisor quotes the measurement instead of an estimate.
    again = _advise(admin, use_case="extraction", experience="quality").json()
    expected = _candidate(again, stack.version)["expected"]
    assert expected["basis"] == "measured" and expected["trial"] == trial.pk
    assert expected["decode_tps"] == round(trial.decode_tps_single, 1)


def test_one_call_deploys_a_candidate(stack):
    answer = client_for(stack.admin).post(
        "/api/v1/setups/advise/apply",
        {
            "use_case": "chat",
            "experience": "creative",
            "model_version": stack.version.pk,
            "action": "deploy",
            "deployment_name": "gemma-creative",
        },
        content_type="application/json",
    )
    assert answer.status_code == 201, answer.content
    deployment = Deployment.objects.get(name="gemma-creative")
    setup = Setup.objects.get(name=answer.json()["setup"]["name"])
    assert (deployment.preset, deployment.parallel_slots) == (setup.preset, setup.parallel_slots)
    assert deployment.kv_cache_type == setup.kv_cache_type
    try:
        wait_for_state(deployment, State.READY, timeout=120)
    finally:
        deployment_services.deployment_stop(actor=stack.admin, deployment=deployment)


def test_bad_input_names_the_field_and_creates_nothing(stack):
    admin = client_for(stack.admin)
    answer = _advise(admin, use_case="poetry", experience="fast")
    assert answer.status_code == 400 and "use_case" in answer.json()
    before = Setup.objects.count()
    answer = admin.post(
        "/api/v1/setups/",
        {
            "name": "too-many-slots",
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
            "parallel_slots": 0,
        },
        content_type="application/json",
    )
    assert answer.status_code == 400 and "parallel_slots" in answer.json()
    answer = admin.post(
        "/api/v1/setups/",
        {
            "name": "too-long",
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
            "context_length": 65_536,
        },
        content_type="application/json",
    )
    assert answer.status_code == 400 and "context_length" in answer.json()
    answer = admin.post(
        "/api/v1/setups/",
        {
            "name": "quantised-without-fa",
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
            "kv_cache_type": "q8_0",
            "flash_attention": False,
        },
        content_type="application/json",
    )
    assert answer.status_code == 400 and "kv_cache_type" in answer.json()
    # /setups/trials/ is the trials list: a setup of that name could never be opened.
    answer = admin.post(
        "/api/v1/setups/",
        {
            "name": "trials",
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
        },
        content_type="application/json",
    )
    assert answer.status_code == 400 and "taken by pages" in str(answer.json()["name"])
    assert Setup.objects.count() == before


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_only_admins_apply_but_every_role_may_ask(stack, role):
    user = make_user(role, username=f"setups-{role}")
    client = client_for(user)
    assert _advise(client, use_case="chat", experience="fast").status_code == 200
    answer = client.post(
        "/api/v1/setups/advise/apply",
        {
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
            "action": "deploy",
        },
        content_type="application/json",
    )
    assert answer.status_code == 403


# -- recipes ---------------------------------------------------------------------------


def _make_setup(stack, name: str, **values) -> Setup:
    answer = client_for(stack.admin).post(
        "/api/v1/setups/",
        {
            "name": name,
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
            "notes": "Four slots for a busy help desk.",
            "context_length": 2048,
            "parallel_slots": 4,
            "kv_cache_type": "q8_0",
            "preset": "balanced",
            **values,
        },
        content_type="application/json",
    )
    assert answer.status_code == 201, answer.content
    return Setup.objects.get(name=name)


def _import(client, data: bytes, **fields):
    upload = io.BytesIO(data)
    upload.name = "recipe.yaml"
    return client.post("/api/v1/setups/import", {"file": upload, **fields})


def test_a_recipe_round_trip_reproduces_the_setup(stack):
    admin = client_for(stack.admin)
    setup = _make_setup(stack, "helpdesk")
    exported = admin.get("/api/v1/setups/helpdesk/recipe")
    assert exported.status_code == 200
    assert exported["Content-Type"].startswith("application/yaml")
    document = yaml.safe_load(exported.content)
    assert document["model"]["sha256"] == stack.version.sha256
    assert document["settings"]["parallel_slots"] == 4
    before = setup.settings_dict()
    # As on a box that never saw it: the setup is gone, the model is there.
    setup.delete()
    answer = _import(admin, exported.content)
    assert answer.status_code == 201, answer.content
    assert answer.json()["trusted"] is True and not answer.json()["warning"]
    imported = Setup.objects.get(name="helpdesk")
    assert imported.settings_dict() == before
    assert imported.model_version == stack.version and imported.origin == Origin.RECIPE
    assert imported.notes == "Four slots for a busy help desk."


def test_a_recipe_round_trip_keeps_a_gpu_split(stack):
    admin = client_for(stack.admin)
    setup = _make_setup(stack, "split-helpdesk", split_mode="row", tensor_split="3,1")
    exported = admin.get("/api/v1/setups/split-helpdesk/recipe")
    document = yaml.safe_load(exported.content)
    assert (document["settings"]["split_mode"], document["settings"]["tensor_split"]) == (
        "row",
        "3,1",
    )
    before = setup.settings_dict()
    setup.delete()
    answer = _import(admin, exported.content)
    assert answer.status_code == 201, answer.content
    imported = Setup.objects.get(name="split-helpdesk")
    assert imported.settings_dict() == before
    assert (imported.split_mode, imported.tensor_split) == ("row", "3,1")
    page = admin.get("/setups/split-helpdesk/").content.decode()
    assert "Rows of each layer across the worker&#x27;s GPUs in the proportions 3,1" in page


def test_a_setup_with_a_bad_split_is_refused_naming_the_field(stack):
    answer = client_for(stack.admin).post(
        "/api/v1/setups/",
        {
            "name": "bad-split",
            "use_case": "chat",
            "experience": "fast",
            "model_version": stack.version.pk,
            "tensor_split": "3,1",
        },
        content_type="application/json",
    )
    assert answer.status_code == 400
    assert "choose the layer or row split mode" in " ".join(answer.json()["tensor_split"])
    assert not Setup.objects.filter(name="bad-split").exists()


def test_a_changed_byte_is_refused(stack):
    admin = client_for(stack.admin)
    _make_setup(stack, "tamper-me")
    data = admin.get("/api/v1/setups/tamper-me/recipe").content
    tampered = data.replace(b"parallel_slots: 4", b"parallel_slots: 8")
    assert tampered != data
    Setup.objects.filter(name="tamper-me").delete()
    answer = _import(admin, tampered)
    assert answer.status_code == 400 and "signature" in answer.json()
    assert not Setup.objects.filter(name="tamper-me").exists()


def test_an_unknown_signer_imports_with_a_warning(stack, settings, tmp_path):
    admin = client_for(stack.admin)
    _make_setup(stack, "from-elsewhere")
    own_key = settings.AUDIT_SIGNING_KEY_FILE
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "other-box.pem"
    other = create_key(settings.AUDIT_SIGNING_KEY_FILE)
    data = admin.get("/api/v1/setups/from-elsewhere/recipe").content
    settings.AUDIT_SIGNING_KEY_FILE = own_key
    answer = _import(admin, data, name="from-elsewhere-2")
    assert answer.status_code == 201, answer.content
    assert answer.json()["trusted"] is False and "does not trust" in answer.json()["warning"]
    setup = Setup.objects.get(name="from-elsewhere-2")
    assert setup.recipe_signer == other.fingerprint and not setup.recipe_signer_trusted
    assert "does not trust" in admin.get("/setups/from-elsewhere-2/").content.decode()
    # Once the operator trusts that key, its recipes import without the warning.
    settings.RECIPE_TRUSTED_KEYS = [other.fingerprint]
    answer = _import(admin, data, name="from-elsewhere-3")
    assert answer.json()["trusted"] is True


def test_a_recipe_for_a_missing_model_offers_the_import(stack):
    admin = client_for(stack.admin)
    _make_setup(stack, "needs-a-model")
    data = admin.get("/api/v1/setups/needs-a-model/recipe").content
    document = yaml.safe_load(data)
    # Another box's recipe names a model imported from Hugging Face that this one lacks:
    # re-sign it with this box's key as that box would have signed it.
    document.pop("signature")
    document["model"]["sha256"] = "ab" * 32
    document["model"]["source"] = {
        "hugging_face": {
            "repo": "acme/helper-7b-GGUF",
            "file": "helper-7b.Q4_K_M.gguf",
            "revision": "0123abc",
        },
        "package": None,
    }
    before = Setup.objects.count()
    answer = _import(admin, recipes.recipe_dump(document), name="missing")
    assert answer.status_code == 409
    assert "acme/helper-7b-GGUF" in answer.json()["detail"]
    assert Setup.objects.count() == before


def _signed_as_written(document: dict) -> bytes:
    """A recipe signed with this box's key exactly as given: ``recipe_dump`` refuses to
    write what a reader would refuse, but another (newer, or broken) writer might."""
    signature = {
        "algorithm": "ed25519",
        "public_key": signing.public_key().base64,
        "value": signing.sign(canonical_json(document).encode("utf-8")),
    }
    return yaml.safe_dump({**document, "signature": signature}, sort_keys=False).encode()


def test_bad_recipe_files_are_refused_with_the_field(stack):
    admin = client_for(stack.admin)
    _make_setup(stack, "schema-test")
    data = admin.get("/api/v1/setups/schema-test/recipe").content
    document = yaml.safe_load(data)
    document.pop("signature")
    document["schema_version"] = 2
    answer = _import(admin, _signed_as_written(document), name="v2")
    assert answer.status_code == 400 and "schema_version" in answer.json()
    answer = _import(admin, b"name: [unclosed", name="broken")
    assert answer.status_code == 400
    answer = _import(admin, b"#" * (recipes.MAX_RECIPE_BYTES + 1), name="huge")
    assert answer.status_code == 400 and "file" in answer.json()
    document["schema_version"] = 1
    document["settings"]["parallel_slots"] = 500
    answer = _import(admin, _signed_as_written(document), name="bad-slots")
    assert answer.status_code == 400 and "settings.parallel_slots" in answer.json()
    assert not Setup.objects.filter(name__in=["v2", "broken", "huge", "bad-slots"]).exists()


def test_the_recipe_book_saves_a_builtin_as_a_setup(stack):
    admin = client_for(stack.admin)
    book = admin.get("/api/v1/setups/recipe-book").json()
    pairs = {(r["use_case"], r["experience"]) for r in book}
    assert {
        ("chat", "fast"),
        ("extraction", "quality"),
        ("chat", "creative"),
        ("long_documents", "quality"),
    } <= pairs
    page = admin.get("/setups/recipes/", {"use_case": "long_documents"}).content.decode()
    long_docs = next(r for r in book if r["use_case"] == "long_documents")
    fast_chat = next(r for r in book if (r["use_case"], r["experience"]) == ("chat", "fast"))
    assert long_docs["name"] in page and fast_chat["name"] not in page
    answer = admin.post(f"/setups/recipes/{long_docs['name']}/use")
    assert answer.status_code == 302
    setup = Setup.objects.filter(origin=Origin.RECIPE, use_case="long_documents").latest("id")
    assert setup.context_length == long_docs["settings"]["context_length"]
    assert setup.model_version == stack.version


# -- when the workers (or the registry) change -------------------------------------------


def _approved_shape(stack, tmp_path, name: str, **shape) -> ModelVersion:
    repo = model_repo_create(
        actor=stack.admin, name=f"{name}-{uuid.uuid4().hex[:4]}", licence="mit"
    )
    path = write_shaped_gguf(tmp_path / f"{name}.gguf", arch="gemma3", **shape)
    version = upload_version(stack.admin, repo, path)
    return model_version_approve(actor=stack.admin, version=version, reason="test")


def _notes(client) -> str:
    return client.get("/setups/fit/").content.decode()


def test_the_deployments_page_says_when_a_better_setup_appears(stack, tmp_path):
    admin = client_for(stack.admin)
    setup = _make_setup(stack, "fit-chat", context_length=2048, parallel_slots=2)
    deployment = services.setup_deploy(actor=stack.admin, setup=setup, name="fit-chat")
    try:
        wait_for_state(deployment, State.READY, timeout=120)
        assert 'data-deployment="fit-chat"' not in _notes(admin)
        # A much smaller chat model is approved: for a fast chat it is now ranked first.
        small = _approved_shape(stack, tmp_path, "small", context=8192, blocks=2, embedding=8)
        try:
            notes = _notes(admin)
            assert 'data-deployment="fit-chat" data-note="better"' in notes
            assert f"the advisor now ranks {small} first" in notes
            # The deployments page loads the notes.
            assert "setups/fit/" in admin.get("/deployments/").content.decode()
        finally:
            model_version_deprecate(actor=stack.admin, version=small, reason="test over")
    finally:
        deployment_services.deployment_stop(actor=stack.admin, deployment=deployment)


def test_a_deployment_on_a_machine_that_left_no_longer_fits(stack, tmp_path):
    """A borrowed GPU server joins, a big model is deployed on it, the server leaves."""
    redis_client = redis.Redis.from_url(settings.REDIS_URL)
    borrowed = f"borrowed-{uuid.uuid4().hex[:4]}@gpu"
    heartbeat = {
        "hostname": borrowed,
        "sent_at": time.time(),
        "serving": True,
        "pool": "threads",
        "cpu_cores": 32,
        "cpu_model": "Test CPU",
        "ram_total_mib": 262_144,
        "ram_available_mib": 250_000,
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA H100",
                "memory_total_mib": 81_559,
                "memory_free_mib": 81_000,
            }
        ],
        "replicas": [],
    }
    redis_client.set(redis_keys.heartbeat_key(borrowed), json.dumps(heartbeat), ex=600)
    redis_client.sadd(redis_keys.WORKERS_SET, borrowed)
    big = _approved_shape(stack, tmp_path, "big", context=4096, blocks=100, embedding=16_384)
    deployment = None
    try:
        # ~26 GB of KV cache: only the borrowed GPU can hold it.
        deployment = deployment_services.deployment_create(
            actor=stack.admin, name="big-on-gpu", model_version=big, context_length=4096
        )
        assert deployment.replica_set.get().worker == borrowed
        assert 'data-deployment="big-on-gpu"' not in _notes(client_for(stack.admin))
        redis_client.delete(redis_keys.heartbeat_key(borrowed))  # the server leaves
        notes = _notes(client_for(stack.admin))
        assert 'data-deployment="big-on-gpu" data-note="no_fit"' in notes
        assert "big-on-gpu no longer fits anywhere" in notes and "MiB free" in notes
    finally:
        redis_client.delete(redis_keys.heartbeat_key(borrowed))
        redis_client.srem(redis_keys.WORKERS_SET, borrowed)
        if deployment is not None:
            deployment_services.deployment_stop(actor=stack.admin, deployment=deployment)
        model_version_deprecate(actor=stack.admin, version=big, reason="test over")


@pytest.mark.parametrize("role", list(Role))
def test_setup_pages_check_the_role(stack, role):
    """Every role reads setups, the advisor and the recipe book; only admins change."""
    setup = Setup.objects.filter(name="page-roles").first() or _make_setup(stack, "page-roles")
    user = make_user(role, username=f"pages-{role}")
    client = client_for(user)
    for page in ("/setups/", "/setups/advisor/", "/setups/recipes/", f"/setups/{setup.name}/"):
        assert client.get(page).status_code == 200, page
    allowed = role == Role.ADMIN
    book = recipes.builtin_recipes()[0].document["name"]
    writes = {
        # (On a worker that is not there: an admin's trial is refused, not run.)
        f"/setups/{setup.name}/trial": {"worker": "nope@nowhere"},
        f"/setups/{setup.name}/recipe": {},
        f"/setups/recipes/{book}/use": {},
        "/setups/switch/nope/": {"setup": setup.pk},
    }
    for path, data in writes.items():
        status = client.post(path, data).status_code
        if allowed:
            assert status in (200, 302, 404), (path, status)  # 404: no deployment "nope"
        else:
            assert status == 403, (path, status)
    assert (client.get("/setups/switch/nope/").status_code == 403) is not allowed
