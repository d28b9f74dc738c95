"""deploy/kubernetes/: valid Kubernetes objects that name things that exist in the project.

No cluster here: every manifest is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: an unknown or misspelt field fails), and the aibox
containers are checked against the code like docker-compose.yml's services
(tests/core/deploy_checks.py): commands, variables, Secrets and ConfigMaps, volumes,
probes, the database roles and the security context.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from celery.app.utils import find_app
from django.conf import settings
from django.urls import Resolver404, resolve

from tests.core.deploy_checks import (
    REQUIRED_ENV,
    ROOT,
    check_program,
    check_queues,
    command_steps,
    option_values,
)
from workers.labels import labels_parse

KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests are checked against (docs/kubernetes.md).
KUBERNETES_VERSION = "1.31"
# base: the app; trial: base plus a bundled PostgreSQL and Redis; gpu: the GPU worker.
KUSTOMIZATIONS = ("base", "trial", "gpu")
SECRETS_EXAMPLE = KUBERNETES / "secrets.example.yaml"
# The fields of a kustomization.yaml that these checks understand (kubectl apply -k
# would honour more, which would then escape them).
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images"}
AIBOX_IMAGES = ("aibox", "aibox-gpu")
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Variables that must come from a Secret, never a ConfigMap or the manifest itself.
SECRET_VARIABLES = {
    "AIBOX_SECRET_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "AIBOX_DATABASE_APP_PASSWORD",
    "AIBOX_API_KEY_HMAC_KEY",
    "AIBOX_USAGE_HASH_KEY",
    "AIBOX_HF_TOKEN",
    "AIBOX_OIDC_CLIENT_SECRET",
    "AIBOX_WORKER_TOKEN",
}
# The paths each component writes (settings that name a file or directory): they must lie
# on a writable volume, since the root filesystem is read-only.
WRITES = {
    "aibox-migrate": (),
    "aibox-web": (
        "AIBOX_ARTIFACT_ROOT",
        "AIBOX_AUDIT_SIGNING_KEY_FILE",
        "AIBOX_AUDIT_CHECKPOINT_FILE",
    ),
    # The default queue runs the audit checkpoint, which signs with the key.
    "aibox-worker-jobs": (
        "AIBOX_ARTIFACT_ROOT",
        "AIBOX_AUDIT_SIGNING_KEY_FILE",
        "AIBOX_AUDIT_CHECKPOINT_FILE",
    ),
    # Serving workers pull model files over HTTP into their own cache: nothing shared.
    "aibox-worker-cpu": ("AIBOX_MODEL_CACHE_DIR",),
    "aibox-worker-gpu": ("AIBOX_MODEL_CACHE_DIR",),
    # Training workers pull their inputs into their own cache and send adapters back.
    "aibox-worker-train": (
        "AIBOX_MODEL_CACHE_DIR",
        "AIBOX_FINETUNE_WORK_DIR",
        "AIBOX_FINETUNE_CACHE_DIR",
    ),
    "aibox-beat": (),
}
# Serving workers reach only Redis and the web (issue 21): no database, no shared claim;
# so do training workers, which run fine-tunes and optimise jobs over HTTP.
SERVING_WORKERS = ("aibox-worker-cpu", "aibox-worker-gpu")
REMOTE_WORKERS = (*SERVING_WORKERS, "aibox-worker-train")
SERVING_REQUIRED_ENV = (
    "AIBOX_SECRET_KEY",
    "REDIS_URL",
    "AIBOX_CONTROL_PLANE_URL",
    "AIBOX_WORKER_TOKEN",
    "AIBOX_MODEL_CACHE_DIR",
    "AIBOX_MODEL_CACHE_MAX_BYTES",
    "AIBOX_WORKER_LABELS",
)
# Files a command names with an option: they too must be writable.
PATH_OPTIONS = ("--credentials-file", "--schedule")
# What serves the probes (apps/core/urls.py).
PROBE_VIEWS = {"/healthz": "core:healthz", "/readyz": "core:readyz"}


@dataclass(frozen=True)
class Workload:
    """A Deployment, StatefulSet or Job, as one of the kustomizations builds it."""

    kustomization: str
    source: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]

    @property
    def pod(self) -> dict[str, Any]:
        return self.manifest["spec"]["template"]["spec"]

    @property
    def containers(self) -> list[dict[str, Any]]:
        return [*(self.pod.get("initContainers") or []), *self.pod["containers"]]

    @property
    def is_aibox(self) -> bool:
        return any(image_name(c["image"]) in AIBOX_IMAGES for c in self.containers)


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERNETES / name / "kustomization.yaml").read_text())


def build(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The objects ``kubectl apply -k directory`` would apply, for the fields these
    checks allow (resources, namespace, images), with the images renamed."""
    config = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = sorted(set(config) - KUSTOMIZATION_FIELDS)
    assert not unknown, f"{directory.name}/kustomization.yaml: fields {unknown} are not checked"
    objects: list[tuple[Path, dict[str, Any]]] = []
    for resource in config.get("resources") or []:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory.name}/kustomization.yaml: {resource} does not exist"
        if path.is_dir():
            objects += build(path)
        else:
            objects += [(path, obj) for obj in load(path)]
    renames = {i["name"]: i for i in config.get("images") or []}
    for _, obj in objects:
        if config.get("namespace") and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = config["namespace"]
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            rename = renames.get(container["image"])
            if rename:
                container["image"] = f"{rename['newName']}:{rename['newTag']}"
    return objects


@pytest.fixture(scope="module")
def built() -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    return {name: build(KUBERNETES / name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def workloads(built) -> dict[str, Workload]:
    """Each workload once, from the kustomization that brings it first (base before trial)."""
    found: dict[str, Workload] = {}
    for name in KUSTOMIZATIONS:
        for source, obj in built[name]:
            if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
                found.setdefault(obj["metadata"]["name"], Workload(name, source, obj))
    return found


@pytest.fixture(scope="module")
def aibox(workloads) -> dict[str, Workload]:
    return {name: w for name, w in workloads.items() if w.is_aibox}


@pytest.fixture(scope="module")
def config_maps(built) -> dict[str, dict[str, str]]:
    return {
        obj["metadata"]["name"]: obj.get("data") or {}
        for objects in built.values()
        for _, obj in objects
        if obj["kind"] == "ConfigMap"
    }


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: s.get("stringData") or {} for s in load(SECRETS_EXAMPLE)}


def environment(
    container: dict[str, Any],
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
) -> dict[str, tuple[str, str]]:
    """Variable -> (where it comes from, its value with the example Secrets), resolved as
    Kubernetes does: envFrom in order, then env, which wins."""
    env: dict[str, tuple[str, str]] = {}
    sources = {"configMapRef": ("ConfigMap", config_maps), "secretRef": ("Secret", secrets)}
    for entry in container.get("envFrom") or []:
        ((ref, target),) = entry.items()
        kind, known = sources[ref]
        assert target["name"] in known, f"{container['name']}: no {kind} {target['name']!r}"
        for key, value in known[target["name"]].items():
            env[key] = (f"{kind} {target['name']}", str(value))
    key_refs = {"configMapKeyRef": ("ConfigMap", config_maps), "secretKeyRef": ("Secret", secrets)}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = ("value", str(entry["value"]))
            continue
        ((ref, target),) = entry["valueFrom"].items()
        kind, known = key_refs[ref]
        values = known.get(target["name"])
        assert values is not None, f"{container['name']}: no {kind} {target['name']!r}"
        assert target["key"] in values, (
            f"{container['name']}: {kind} {target['name']} has no key {target['key']!r}"
        )
        env[entry["name"]] = (f"{kind} {target['name']}", str(values[target["key"]]))
    return env


def mounts(workload: Workload, container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> the pod's volume, for the container's mounts."""
    volumes = {v["name"]: v for v in workload.pod.get("volumes") or []}
    claims = {
        t["metadata"]["name"] for t in workload.manifest["spec"].get("volumeClaimTemplates", [])
    }
    result = {}
    for mount in container.get("volumeMounts") or []:
        assert mount["name"] in volumes or mount["name"] in claims, (
            f"{workload.name}/{container['name']}: mounts the undeclared volume {mount['name']!r}"
        )
        volume = volumes.get(mount["name"], {"name": mount["name"], "claimTemplate": True})
        result[mount["mountPath"]] = {**volume, "readOnly": mount.get("readOnly", False)}
    return result


def writable_mount(path: str, mounted: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    for mount_path, volume in mounted.items():
        if PurePosixPath(path).is_relative_to(mount_path) and not volume["readOnly"]:
            return volume
    return None


def main_container(workload: Workload) -> dict[str, Any]:
    (container,) = workload.pod["containers"]
    return container


def name_serves(name: str) -> bool:
    """A worker that reaches only Redis and the web (serving, or training over HTTP)."""
    return name in REMOTE_WORKERS


def uid_in_dockerfile() -> int:
    match = re.search(r"useradd\b[^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile does not fix the aibox user's uid (useradd --uid)"
    return int(match.group(1))


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_object_is_valid_against_the_kubernetes_schemas(path):
    objects = load(path)
    assert objects, f"{path.name}: no objects"
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{path.name}: {obj.get('kind')} {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


def test_every_manifest_is_applied_by_a_kustomization(built):
    applied = {source for objects in built.values() for source, _ in objects}
    # The Secrets are created by hand, from a filled-in copy of the example.
    missing = sorted(
        str(p.relative_to(KUBERNETES))
        for p in manifest_files()
        if p not in applied | {SECRETS_EXAMPLE}
    )
    assert not missing, f"no kustomization applies {missing}"
    namespaces = [obj for _, obj in built["base"] if obj["kind"] == "Namespace"]
    assert len(namespaces) == 1, "base/ should create the namespace"
    namespace = namespaces[0]["metadata"]["name"]
    for name in KUSTOMIZATIONS:
        assert kustomization(name).get("namespace") == namespace, (
            f"{name}/kustomization.yaml does not put its objects in the namespace {namespace}"
        )
    for secret in load(SECRETS_EXAMPLE):
        assert secret["metadata"].get("namespace") == namespace, (
            f"the example Secret {secret['metadata']['name']} is not in {namespace}"
        )
    for name, objects in built.items():
        keys = [(o["kind"], o["metadata"]["name"]) for _, o in objects]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        assert not duplicates, f"{name}: objects defined twice {duplicates}"


def test_one_image_and_one_tag_everywhere(built, workloads):
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    tags = {
        image["name"]: image["newTag"]
        for name in KUSTOMIZATIONS
        for image in kustomization(name).get("images") or []
    }
    assert set(tags) == set(AIBOX_IMAGES), f"kustomizations name the images {sorted(tags)}"
    assert len(set(tags.values())) == 1, f"the CPU and GPU images differ in tag: {tags}"
    for workload in workloads.values():
        for container in workload.containers:
            image = container["image"]
            where = f"{workload.name}/{container['name']}"
            if not workload.is_aibox:
                # The bundled trial services run what docker-compose.yml runs.
                service = workload.name.removeprefix("aibox-")
                assert image == compose[service]["image"], (
                    f"{where}: {image}, but docker-compose.yml runs {compose[service]['image']}"
                )
                continue
            expected = "aibox-gpu" if workload.name == "aibox-worker-gpu" else "aibox"
            assert image_name(image) == expected and image.endswith(f":{tags[expected]}"), (
                f"{where}: runs {image}, not the {expected} image at the shared tag"
            )


def test_the_components_exist(aibox, workloads):
    expected = {*WRITES}
    assert set(aibox) == expected, f"aibox workloads: {sorted(aibox)}, expected {sorted(expected)}"
    trial = {name for name, w in workloads.items() if w.kustomization == "trial"}
    assert trial == {"aibox-postgres", "aibox-redis"}, f"the trial adds {sorted(trial)}"
    for name in trial:
        assert workloads[name].manifest["kind"] == "StatefulSet", f"{name}: not a StatefulSet"
        assert workloads[name].manifest["spec"].get("volumeClaimTemplates"), (
            f"{name}: keeps its data on no claim"
        )
        assert "NOT FOR PRODUCTION" in workloads[name].source.read_text(), (
            f"{workloads[name].source.name}: not labelled as not for production"
        )


def test_command_programs_are_installed_and_their_targets_exist(aibox):
    for workload in aibox.values():
        for container in workload.containers:
            where = f"{workload.name}/{container['name']}"
            assert "args" not in container, f"{where}: the whole command goes in `command`"
            ports = [
                str(v)
                for p in container.get("ports") or []
                for v in (p["containerPort"], p.get("name"))
                if v
            ]
            for argv in command_steps(where, container.get("command")):
                check_program(where, argv, ports=ports)


def test_workers_consume_the_routed_and_default_queues(aibox):
    commands = {
        name: command_steps(name, main_container(w).get("command")) for name, w in aibox.items()
    }
    started_by_default = {name for name, w in aibox.items() if w.kustomization == "base"}
    check_queues(commands, started_by_default=started_by_default)


def test_beat_runs_once(aibox):
    beat = aibox["aibox-beat"].manifest["spec"]
    assert beat.get("replicas") == 1, "two beats would send every periodic task twice"
    assert beat.get("strategy", {}).get("type") == "Recreate", (
        "beat: a rolling update would run the old and new beat side by side"
    )


def test_environment_names_are_settings_variables(aibox, config_maps, secrets):
    for workload in aibox.values():
        for container in workload.containers:
            where = f"{workload.name}/{container['name']}"
            env = environment(container, config_maps, secrets)
            unknown = sorted(set(env) - set(settings.ENVIRONMENT_VARIABLES))
            assert not unknown, f"{where}: {unknown} are not in settings.ENVIRONMENT_VARIABLES"
            required = SERVING_REQUIRED_ENV if name_serves(workload.name) else REQUIRED_ENV
            missing = [v for v in required if not env.get(v, ("", ""))[1]]
            assert not missing, f"{where}: does not set {missing}"
            inline = sorted(
                v for v in SECRET_VARIABLES & set(env) if not env[v][0].startswith("Secret")
            )
            assert not inline, f"{where}: {inline} should come from a Secret"


def test_example_secrets_hold_placeholders_that_fit_together(secrets, workloads):
    for name, values in secrets.items():
        for key, value in values.items():
            assert (
                not value
                or "REPLACE-ME" in value
                or not any(word in key for word in ("KEY", "PASSWORD", "TOKEN", "SECRET"))
            ), f"Secret {name}: {key} should be empty or a REPLACE-ME placeholder"
            assert not value or "REPLACE-ME" in value or key == "REDIS_URL", (
                f"Secret {name}: {key} looks like a real value"
            )
    app = urlsplit(secrets["aibox"]["DATABASE_URL"])
    owner = urlsplit(secrets["aibox-migrate"]["DATABASE_URL"])
    assert app.username == settings.DATABASE_APP_ROLE != owner.username, (
        f"the app connects as {app.username}, the migrate Job as {owner.username}"
    )
    assert app.password == secrets["aibox-migrate"]["AIBOX_DATABASE_APP_PASSWORD"], (
        "the app's DATABASE_URL holds another password than AIBOX_DATABASE_APP_PASSWORD"
    )
    # The example points at the trial's bundled services, as their Services name them.
    postgres = workloads["aibox-postgres"]
    postgres_env = {e["name"]: e for e in main_container(postgres).get("env") or []}
    assert owner.username == postgres_env["POSTGRES_USER"]["value"]
    assert owner.password == secrets["aibox-migrate"]["POSTGRES_PASSWORD"]
    redis = urlsplit(secrets["aibox"]["REDIS_URL"])
    for url, scheme, workload in (
        (app, "postgres", postgres),
        (owner, "postgres", postgres),
        (redis, "redis", workloads["aibox-redis"]),
    ):
        ports = [p["containerPort"] for p in main_container(workload).get("ports") or []]
        assert url.scheme == scheme and url.hostname == workload.manifest["spec"]["serviceName"], (
            f"{url.geturl()} does not point at the trial's {workload.name} Service"
        )
        assert url.port in ports, f"{url.geturl()}: {workload.name} listens on {ports}"


def test_settings_accept_the_configuration(aibox, config_maps, secrets):
    """aibox/settings.py starts with the ConfigMap and the example Secrets (it checks
    booleans, the single sign-on combination, the database engine...)."""
    for name in ("aibox-web", "aibox-worker-jobs", *REMOTE_WORKERS):
        env = environment(main_container(aibox[name]), config_maps, secrets)
        clean = {"PATH": os.environ["PATH"], **{k: v for k, (_, v) in env.items()}}
        result = subprocess.run(
            [sys.executable, "-c", "import aibox.settings"],
            cwd=ROOT,
            env=clean,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, (
            f"{name}: settings refuse the configuration:\n{result.stderr}"
        )


def test_only_the_migrate_job_connects_as_the_tables_owner(aibox, config_maps, secrets):
    """The app runs as the role ``db_app_role`` grants (rows, not the schema), which the
    migrate Job creates after the migrations; the app pods wait for them."""
    migrate = aibox["aibox-migrate"]
    assert migrate.manifest["kind"] == "Job"
    assert migrate.pod["restartPolicy"] in {"Never", "OnFailure"}
    container = main_container(migrate)
    assert [s[:3] for s in command_steps("migrate", container["command"])] == [
        ["python", "manage.py", "migrate"],
        ["python", "manage.py", "db_app_role"],
    ]
    env = environment(container, config_maps, secrets)
    assert env["DATABASE_URL"][0] == "Secret aibox-migrate", "migrate: not the owner's URL"
    assert env["AIBOX_DATABASE_APP_PASSWORD"][0] == "Secret aibox-migrate"
    for name, workload in aibox.items():
        if name == "aibox-migrate":
            continue
        assert "aibox-migrate" not in str(workload.manifest), f"{name} reads the owner's Secret"
        if name_serves(name):
            continue  # no database at all (test_serving_and_training_workers_reach_only_redis…)
        for container in workload.containers:
            env = environment(container, config_maps, secrets)
            user = urlsplit(env["DATABASE_URL"][1]).username
            assert user == settings.DATABASE_APP_ROLE, (
                f"{name}/{container['name']} connects as {user}"
            )
        # Compose's `depends_on: migrate: service_completed_successfully`.
        waits = [
            c
            for c in workload.pod.get("initContainers") or []
            if command_steps(name, c["command"])
            == [["python", "manage.py", "migrate", "--check", "--no-input"]]
        ]
        assert waits, f"{name}: no init container waits for the migrations (migrate --check)"


def test_gpu_worker_requests_an_nvidia_gpu(aibox):
    gpu = aibox["aibox-worker-gpu"]
    resources = main_container(gpu)["resources"]
    assert int(resources["limits"].get("nvidia.com/gpu", 0)) >= 1, (
        "aibox-worker-gpu: no nvidia.com/gpu limit"
    )
    assert gpu.pod.get("nodeSelector"), "aibox-worker-gpu: no nodeSelector for GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu.pod.get("tolerations") or []), (
        "aibox-worker-gpu: does not tolerate the nvidia.com/gpu taint"
    )
    others = [
        name for name, w in aibox.items() if name != gpu.name and "nvidia.com/gpu" in str(w.pod)
    ]
    assert not others, f"{others} hold a GPU"


def test_volumes_are_declared_and_paths_are_writable(aibox, built, config_maps, secrets):
    claims = {
        obj["metadata"]["name"]: obj["spec"]
        for objects in built.values()
        for _, obj in objects
        if obj["kind"] == "PersistentVolumeClaim"
    }
    for name, workload in aibox.items():
        for volume in workload.pod.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            assert claim is None or claim in claims, f"{name}: no claim {claim!r}"
        container = main_container(workload)
        mounted = mounts(workload, container)
        env = environment(container, config_maps, secrets)
        for variable in WRITES[name]:
            path = env[variable][1]
            assert writable_mount(path, mounted), (
                f"{name}: {variable} ({path}) is on no writable volume"
            )
        for argv in command_steps(name, container["command"]):
            for i, token in enumerate(argv):
                if token in PATH_OPTIONS:
                    assert writable_mount(argv[i + 1], mounted), (
                        f"{name}: {token} {argv[i + 1]} is on no writable volume"
                    )
        artifacts = writable_mount(env["AIBOX_ARTIFACT_ROOT"][1], mounted)
        if "AIBOX_ARTIFACT_ROOT" in WRITES[name]:
            # Workers open model files by path: every pod sees the same store.
            claim = artifacts["persistentVolumeClaim"]["claimName"]
            assert claims[claim]["accessModes"] == ["ReadWriteMany"], (
                f"{name}: the artifact store {claim} is not ReadWriteMany"
            )


def test_pods_run_unprivileged_with_a_read_only_root(workloads):
    uid = uid_in_dockerfile()
    for name, workload in workloads.items():
        pod = workload.pod.get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True, f"{name}: not runAsNonRoot"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
        if workload.is_aibox:
            assert pod.get("runAsUser") == uid, f"{name}: runs as {pod.get('runAsUser')}, not {uid}"
        assert workload.pod.get("automountServiceAccountToken") is False, (
            f"{name}: needs no Kubernetes API token"
        )
        for container in workload.containers:
            where = f"{name}/{container['name']}"
            context = container.get("securityContext") or {}
            assert context.get("allowPrivilegeEscalation") is False, f"{where}: may escalate"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            assert context.get("readOnlyRootFilesystem") is True, f"{where}: writable root"
            if workload.is_aibox:
                assert writable_mount("/tmp", mounts(workload, container)), (  # noqa: S108
                    f"{where}: no writable /tmp"
                )
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests") or {}), (
                f"{where}: requests no cpu and memory"
            )
            assert "memory" in (resources.get("limits") or {}), f"{where}: no memory limit"


def test_selectors_match_their_pods(built):
    for name, objects in built.items():
        templates = []
        for _, obj in objects:
            if obj["kind"] in {"Deployment", "StatefulSet"}:
                selector = obj["spec"]["selector"]["matchLabels"]
                labels = obj["spec"]["template"]["metadata"]["labels"]
                assert selector.items() <= labels.items(), (
                    f"{obj['metadata']['name']}: its selector misses its own pods"
                )
                templates.append(obj["spec"]["template"])
        for _, obj in objects:
            if obj["kind"] != "Service":
                continue
            selector = obj["spec"]["selector"]
            pods = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
            assert len(pods) == 1, f"{name}: Service {obj['metadata']['name']} selects {len(pods)}"
            ports = {
                v
                for c in pods[0]["spec"]["containers"]
                for p in c.get("ports") or []
                for v in (p["containerPort"], p.get("name"))
            }
            for port in obj["spec"].get("ports") or []:
                assert port.get("targetPort", port["port"]) in ports, (
                    f"Service {obj['metadata']['name']}: no container port {port.get('targetPort')}"
                )


def test_web_probes_ask_the_health_endpoints(aibox, config_maps, secrets):
    web = main_container(aibox["aibox-web"])
    allowed = environment(web, config_maps, secrets)["AIBOX_ALLOWED_HOSTS"][1].split(",")
    ports = {v for p in web["ports"] for v in (p["containerPort"], p.get("name"))}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in web, f"aibox-web: no {probe}"
        get = web[probe]["httpGet"]
        try:
            match = resolve(get["path"])
        except Resolver404:
            pytest.fail(f"aibox-web {probe}: {get['path']} is not a URL of aibox/urls.py")
        assert PROBE_VIEWS.get(get["path"]) == match.view_name, (
            f"aibox-web {probe}: {get['path']} is {match.view_name}, not a health endpoint"
        )
        assert get["port"] in ports, f"aibox-web {probe}: no container port {get['port']}"
        # Django answers 400 to a Host it does not allow, and a pod's IP is not known.
        host = {h["name"].lower(): h["value"] for h in get.get("httpHeaders") or []}.get("host")
        assert host in allowed, f"aibox-web {probe}: Host {host!r} is not in AIBOX_ALLOWED_HOSTS"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz", (
        "liveness must not depend on the database: a restart cannot fix it"
    )
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_serving_workers_keep_their_names(aibox, config_maps, secrets):
    """A worker is named after its pod (``cpu@%h``); a restarted worker reloads the
    replicas placed on its name, so serving workers need stable pod names."""
    for name, workload in aibox.items():
        container = main_container(workload)
        env = environment(container, config_maps, secrets)
        argv = command_steps(name, container["command"])[-1]
        serving = argv[:1] == ["celery"] and "worker" in argv
        if serving and env.get("AIBOX_WORKER_SERVING", ("", "true"))[1] != "false":
            assert workload.manifest["kind"] == "StatefulSet", (
                f"{name}: a serving worker in a {workload.manifest['kind']} changes name"
            )


def size_bytes(quantity: str) -> int:
    """A Kubernetes quantity such as ``64Gi`` or ``500M``, in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(quantity.removesuffix(unit)) * factor
    return int(quantity)


def test_serving_and_training_workers_reach_only_redis_and_the_web(
    aibox, built, config_maps, secrets
):
    """The serving workers (CPU and GPU) and the training worker mount no artifact store
    nor any other shared claim and hold no database URL: they pull model files from the
    web's Service with a credential from a Secret of their own, into a bounded cache."""
    services = {
        obj["metadata"]["name"]: obj["spec"]
        for objects in built.values()
        for _, obj in objects
        if obj["kind"] == "Service"
    }
    default_queue = find_app("aibox").conf.task_default_queue
    for name in REMOTE_WORKERS:
        workload = aibox[name]
        claims = [v for v in workload.pod.get("volumes") or [] if "persistentVolumeClaim" in v]
        assert not claims, f"{name}: mounts the claims {[v['name'] for v in claims]}"
        assert "aibox-artifacts" not in str(workload.manifest), f"{name}: names the store"
        for container in workload.containers:
            where = f"{name}/{container['name']}"
            env = environment(container, config_maps, secrets)
            assert "DATABASE_URL" not in env, f"{where}: holds a database URL"
            whole = [
                e["secretRef"]["name"] for e in container.get("envFrom") or [] if "secretRef" in e
            ]
            assert not whole, f"{where}: reads every key of the Secrets {whole}"
        container = main_container(workload)
        env = environment(container, config_maps, secrets)
        token = next(e for e in container["env"] if e["name"] == "AIBOX_WORKER_TOKEN")
        secret = token["valueFrom"]["secretKeyRef"]["name"]
        assert secret != "aibox", f"{name}: its credential should be in a Secret of its own"
        key = next(e for e in container["env"] if e["name"] == "AIBOX_SECRET_KEY")
        assert key["valueFrom"]["secretKeyRef"]["name"] == secret, (
            f"{name}: should have a secret key of its own, not the web's"
        )
        url = urlsplit(env["AIBOX_CONTROL_PLANE_URL"][1])
        assert url.hostname in services, f"{name}: {url.geturl()} is no Service of these"
        assert url.port in [p["port"] for p in services[url.hostname]["ports"]], (
            f"{name}: {url.geturl()}: the Service {url.hostname} has no port {url.port}"
        )
        allowed = env["AIBOX_ALLOWED_HOSTS"][1].split(",")
        assert url.hostname in allowed, f"{name}: the web refuses the Host {url.hostname}"
        assert resolve(f"{url.path}/internal/v1/artifacts/{'0' * 64}").view_name, (
            f"{name}: the web serves no artifacts under {url.geturl()}"
        )
        cache = writable_mount(env["AIBOX_MODEL_CACHE_DIR"][1], mounts(workload, container))
        limit = int(env["AIBOX_MODEL_CACHE_MAX_BYTES"][1])
        assert cache and 0 < limit <= size_bytes(cache["emptyDir"]["sizeLimit"]), (
            f"{name}: AIBOX_MODEL_CACHE_MAX_BYTES {limit} does not fit its cache volume"
        )
        for argv in command_steps(name, container["command"]):
            queues = {q for v in option_values(argv, "-Q", "--queues") for q in v.split(",")}
            assert default_queue not in queues, f"{name}: takes the default queue"
            if name == "aibox-worker-train":
                # Fine-tunes and optimise jobs: neither needs the database any more.
                assert queues == {"training", "optimise"}, f"{name}: takes {sorted(queues)}"
        labels = labels_parse(env["AIBOX_WORKER_LABELS"][1])
        assert labels, f"{name}: declares no labels"
    gpu = environment(main_container(aibox["aibox-worker-gpu"]), config_maps, secrets)
    assert "gpu=nvidia" in labels_parse(gpu["AIBOX_WORKER_LABELS"][1])
