"""docker-compose.yml: every service names things that really exist in the project.

No Docker here: the file is parsed and each command, variable, build argument and volume
is checked against the code, the virtual environment and the Dockerfile, so that a
typo surfaces in the test suite and not on the production host.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery.app.utils import find_app
from django.conf import settings

from tests.core.deploy_checks import (
    REQUIRED_ENV,
    ROOT,
    check_program,
    check_queues,
    command_steps,
    option_values,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"

SERVICES = ("postgres", "redis", "migrate", "web", "worker", "worker-train", "worker-gpu", "beat")
AIBOX_SERVICES = ("migrate", "web", "worker", "worker-train", "worker-gpu", "beat")
# Services that run the app, as the app's database role (apps/core/database.py).
APP_SERVICES = ("web", "worker", "worker-train", "worker-gpu", "beat")
# Services that read or write artifacts; beat only enqueues.
ARTIFACT_SERVICES = ("web", "worker", "worker-train", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def steps(name: str, service: dict[str, Any]) -> list[list[str]]:
    return command_steps(name, service.get("command"))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)


def without_interpolation(value: str) -> str:
    # "${POSTGRES_PASSWORD:?...}" holds characters (`?`, spaces) that would confuse a URL parser.
    return re.sub(r"\$\{[^}]*\}", "x", value)


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> mount path (short ``name:/path[:mode]`` or long syntax)."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source, _, rest = entry.partition(":")
            mounts[source] = rest.split(":")[0]
        elif entry.get("type", "volume") == "volume":
            mounts[entry["source"]] = entry["target"]
    return mounts


def all_steps(services: dict[str, dict[str, Any]]) -> dict[str, list[list[str]]]:
    return {name: steps(name, services[name]) for name in AIBOX_SERVICES}


def test_the_services_exist(services):
    missing = sorted(set(SERVICES) - set(services))
    assert not missing, f"docker-compose.yml lacks the services {missing}"


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_an_image_or_a_buildable_context(services, name):
    service = services[name]
    build = service.get("build")
    assert service.get("image") or build, f"{name}: neither image nor build"
    if build is None:
        return
    if isinstance(build, str):
        build = {"context": build}
    context = ROOT / build.get("context", ".")
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file(), f"{name}: builds from {dockerfile}, which does not exist"
    declared = set(re.findall(r"^\s*ARG\s+(\w+)", dockerfile.read_text(), re.MULTILINE))
    # Docker ignores a build argument the Dockerfile does not declare, silently.
    undeclared = sorted(set(build.get("args") or {}) - declared)
    assert not undeclared, f"{name}: build args {undeclared} are not ARGs in {dockerfile.name}"


@pytest.mark.parametrize("name", AIBOX_SERVICES)
def test_command_programs_are_installed_and_their_targets_exist(services, name):
    published = [str(p).rsplit(":", 1)[-1] for p in services[name].get("ports") or []]
    for argv in steps(name, services[name]):
        check_program(name, argv, ports=published)


def test_workers_consume_the_routed_and_default_queues(services):
    started_by_default = {name for name in AIBOX_SERVICES if not services[name].get("profiles")}
    check_queues(all_steps(services), started_by_default=started_by_default)


@pytest.mark.parametrize("name", AIBOX_SERVICES)
def test_environment_names_are_settings_variables(services, name):
    service = services[name]
    assert "env_file" not in service, f"{name}: env_file hides which variables it sets"
    env = environment(service)
    unknown = sorted(set(env) - set(settings.ENVIRONMENT_VARIABLES))
    assert not unknown, f"{name}: {unknown} are not in settings.ENVIRONMENT_VARIABLES"
    missing = [v for v in REQUIRED_ENV if not env.get(v)]
    assert not missing, f"{name}: does not set {missing}"
    # The key comes from the operator's environment, never from this file.
    assert env["AIBOX_SECRET_KEY"].startswith("${AIBOX_SECRET_KEY:?"), (
        f"{name}: AIBOX_SECRET_KEY must be a required ${{...:?}} interpolation"
    )
    for variable, scheme, target in (
        ("DATABASE_URL", "postgres", "postgres"),
        ("REDIS_URL", "redis", "redis"),
    ):
        url = urlsplit(without_interpolation(env[variable]))
        assert url.scheme == scheme and url.hostname == target and target in services, (
            f"{name}: {variable} should point at the {target} service, not {env[variable]!r}"
        )


@pytest.mark.parametrize("name", AIBOX_SERVICES)
def test_aibox_services_wait_for_healthy_database_and_redis(services, name):
    depends = services[name].get("depends_on") or {}
    for dependency in ("postgres", "redis"):
        assert isinstance(depends, dict) and dependency in depends, (
            f"{name}: does not depend on {dependency}"
        )
        assert depends[dependency].get("condition") == "service_healthy", (
            f"{name}: should wait for {dependency} to be healthy"
        )
        assert services[dependency].get("healthcheck"), f"{dependency}: no healthcheck"


def test_only_the_migrate_service_connects_as_the_tables_owner(services):
    """The app runs as the role ``db_app_role`` grants (rows, not the schema), which the
    migrate service creates after the migrations, before any app service starts."""
    migrate = environment(services["migrate"])
    owner = urlsplit(without_interpolation(migrate["DATABASE_URL"])).username
    assert owner == services["postgres"]["environment"]["POSTGRES_USER"]
    assert [step[:3] for step in steps("migrate", services["migrate"])] == [
        ["python", "manage.py", "migrate"],
        ["python", "manage.py", "db_app_role"],
    ]
    assert services["migrate"].get("restart") == "no", "migrate runs once per `up`"
    for name in APP_SERVICES:
        env = environment(services[name])
        user = urlsplit(without_interpolation(env["DATABASE_URL"])).username
        assert user == settings.DATABASE_APP_ROLE != owner, f"{name} connects as {user}"
        assert "POSTGRES_PASSWORD" not in str(services[name]), f"{name} holds the owner's password"
        depends = services[name].get("depends_on") or {}
        assert depends.get("migrate", {}).get("condition") == "service_completed_successfully", (
            f"{name}: does not wait for the migrate service to succeed"
        )


def test_gpu_worker_reserves_an_nvidia_gpu(services):
    service = services["worker-gpu"]
    devices = (
        ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    ).get("devices") or []
    assert any(
        d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices
    ), "worker-gpu: reserves no nvidia device with the gpu capability"
    args = service["build"].get("args") or {}
    assert "-DGGML_CUDA=on" in str(args.get("CMAKE_ARGS", "")), (
        "worker-gpu: llama.cpp is not built with CUDA (CMAKE_ARGS)"
    )
    assert str(args.get("BASE_IMAGE", "")).startswith("nvidia/cuda:") and "devel" in str(
        args["BASE_IMAGE"]
    ), "worker-gpu: needs an nvidia/cuda devel base image to compile CUDA"


def test_database_and_artifact_volumes_are_declared_and_mounted(compose, services):
    declared = set(compose.get("volumes") or {})
    assert {"pgdata", "artifacts"} <= declared, f"volumes declared: {sorted(declared)}"
    assert volume_mounts(services["postgres"]).get("pgdata") == "/var/lib/postgresql/data", (
        "postgres: pgdata is not mounted at /var/lib/postgresql/data"
    )
    for name in ARTIFACT_SERVICES:
        root = environment(services[name]).get("AIBOX_ARTIFACT_ROOT")
        assert volume_mounts(services[name]).get("artifacts") == root, (
            f"{name}: the artifacts volume is not mounted at AIBOX_ARTIFACT_ROOT ({root})"
        )
    for name, service in services.items():
        undeclared = sorted(
            v
            for v in volume_mounts(service)
            if not v.startswith((".", "/", "~")) and v not in declared
        )
        assert not undeclared, f"{name}: mounts undeclared volumes {undeclared}"


def test_dockerfile_copies_the_code_that_exists():
    """The Dockerfile copies path by path (never .env or .venv): it must name every part."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        source.rstrip("/")
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile, re.MULTILINE)
        for source in line.split()[:-1]
    ]
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"Dockerfile copies {missing}, which do not exist"
    needed = {"pyproject.toml", "manage.py", "aibox", "apps", "workers", "templates", "static"}
    assert needed <= set(sources), f"Dockerfile does not copy {sorted(needed - set(sources))}"


REMOTE_WORKER_FILE = ROOT / "deploy" / "compose" / "remote-worker.yml"
EXPOSE_FILE = ROOT / "deploy" / "compose" / "expose-services.yml"


@pytest.fixture(scope="module")
def remote() -> dict[str, Any]:
    return yaml.safe_load(REMOTE_WORKER_FILE.read_text())


def test_remote_worker_runs_a_serving_worker_against_the_first_host(remote):
    """deploy/compose/remote-worker.yml: checked like the services above; its Redis and
    web server are the first host's, and its workers (serving, and training and optimising
    over HTTP) have no database URL and no shared store."""
    workers = remote["services"]
    assert workers, "remote-worker.yml has no services"
    for name, service in workers.items():
        build = service["build"] if isinstance(service["build"], dict) else {}
        context = REMOTE_WORKER_FILE.parent / (build.get("context") or service["build"])
        assert (context / "Dockerfile").is_file(), f"{name}: builds from {context}, no Dockerfile"
        declared = set(re.findall(r"^\s*ARG\s+(\w+)", (context / "Dockerfile").read_text(), re.M))
        assert set(build.get("args") or {}) <= declared, f"{name}: undeclared build args"
        argvs = steps(name, service)
        for argv in argvs:
            check_program(name, argv, ports=())
            assert argv[0] == "celery", f"{name}: runs {argv[0]}, not a Celery worker"
        env = environment(service)
        unknown = sorted(set(env) - set(settings.ENVIRONMENT_VARIABLES))
        assert not unknown, f"{name}: {unknown} are not in settings.ENVIRONMENT_VARIABLES"
        required = (
            "AIBOX_SECRET_KEY",
            "REDIS_URL",
            "AIBOX_CONTROL_PLANE_URL",
            "AIBOX_WORKER_TOKEN",
        )
        missing = [v for v in required if not env.get(v)]
        assert not missing, f"{name}: does not set {missing}"
        # A serving worker on another host needs no database and no shared disk: it
        # pulls model files over HTTP with its own credential (issue 21).
        assert "DATABASE_URL" not in env, f"{name}: holds a database URL"
        assert "PASSWORD" not in str(service), f"{name} holds a password"
        assert "${AIBOX_WORKER_TOKEN:?" in env["AIBOX_WORKER_TOKEN"]
        assert "${AIBOX_WORKER_SECRET_KEY:?" in env["AIBOX_SECRET_KEY"], (
            f"{name}: should have a secret key of its own, not the first host's"
        )
        url = urlsplit(without_interpolation(env["REDIS_URL"]))
        assert url.scheme == "redis" and url.port == 6379, f"{name}: REDIS_URL {url.geturl()}"
        assert "${AIBOX_MAIN_HOST:?" in env["REDIS_URL"], (
            f"{name}: REDIS_URL should point at the first host (AIBOX_MAIN_HOST)"
        )
        # Without the first host's keys and audit volumes it must not take the default
        # queue, which runs the signed audit checkpoint.
        default_queue = find_app("aibox").conf.task_default_queue
        for argv in argvs:
            queues = {q for v in option_values(argv, "-Q", "--queues") for q in v.split(",")}
            assert queues and default_queue not in queues, f"{name}: takes the queues {queues}"
        # Only volumes of this host's own (the first host's store is never mounted); a
        # training worker also keeps its jobs' checkpoints and converted models.
        own = {"model-cache"} | (
            {"finetune", "finetune-cache"} if name == "worker-train" else set()
        )
        assert set(volume_mounts(service)) == own, f"{name}: mounts a shared store"
        assert own <= set(remote["volumes"]), f"{name}: mounts volumes not declared here"
        if name == "worker-train":
            # Fine-tunes and optimise jobs: neither needs the database any more.
            assert queues == {"training", "optimise"}, f"{name}: takes the queues {queues}"
        assert volume_mounts(service)["model-cache"] == env["AIBOX_MODEL_CACHE_DIR"]
    assert "driver_opts" not in str(remote["volumes"]), "remote-worker.yml mounts over the network"


def test_expose_services_publishes_what_remote_workers_reach(services):
    exposed = yaml.safe_load(EXPOSE_FILE.read_text())["services"]
    assert set(exposed) == {"postgres", "redis"} <= set(services)
    for name, port in (("postgres", "5432"), ("redis", "6379")):
        (published,) = exposed[name]["ports"]
        # Only on the private address given, never on every interface.
        assert published.startswith("${AIBOX_PRIVATE_ADDRESS:?"), f"{name}: published {published}"
        assert published.endswith(f":{port}:{port}"), f"{name}: published {published}"
