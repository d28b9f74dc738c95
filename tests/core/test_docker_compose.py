"""docker-compose.yml: every service names things that really exist in the project.

No Docker here: the file is parsed and each command, variable, build argument and volume
is checked against the code, the virtual environment and the Dockerfile, so that a
typo surfaces in the test suite and not on the production host.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from celery import Celery
from celery.app.utils import find_app
from celery.bin.celery import celery as celery_cli
from django.conf import settings
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The virtual environment the tests run in is the project's.
VENV_BIN = Path(sys.executable).parent

SERVICES = ("postgres", "redis", "migrate", "web", "worker", "worker-gpu", "beat")
AIBOX_SERVICES = ("migrate", "web", "worker", "worker-gpu", "beat")
# Services that run the app, as the app's database role (apps/core/database.py).
APP_SERVICES = ("web", "worker", "worker-train", "worker-gpu", "beat")
# Services that read or write artifacts; beat only enqueues.
ARTIFACT_SERVICES = ("web", "worker", "worker-gpu")
REQUIRED_ENV = ("AIBOX_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "AIBOX_ARTIFACT_ROOT")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def steps(name: str, service: dict[str, Any]) -> list[list[str]]:
    """The service's command as argv lists: one per ``&&`` step of an ``sh -c`` script."""
    assert service.get("command"), f"{name}: no command"
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    assert len(argv) == 3, f"{name}: `sh -c` takes exactly one script argument"
    result: list[list[str]] = [[]]
    for token in shlex.split(argv[2]):
        if token == "&&":
            result.append([])
        else:
            assert token not in {";", "||", "|", "&"}, f"{name}: chain steps with && only"
            result[-1].append(token)
    # `exec` hands PID 1 to the last program, so it gets the container's signals.
    return [s[1:] if s[:1] == ["exec"] else s for s in result]


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


def click_options(*commands: click.Command) -> set[str]:
    return {
        opt
        for command in commands
        for param in command.params
        for opt in (*param.opts, *param.secondary_opts)
        if opt.startswith("-")
    }


def option_values(argv: list[str], *names: str) -> list[str]:
    """Values of an option given as ``--name value``, ``--name=value`` or ``-X value``."""
    values = []
    for i, token in enumerate(argv):
        flag, eq, inline = token.partition("=")
        if flag in names:
            values.append(inline if eq else argv[i + 1])
    return values


def unknown_options(argv: list[str], known: set[str]) -> list[str]:
    return [t.split("=")[0] for t in argv if t.startswith("-") and t.split("=")[0] not in known]


def celery_parts(name: str, argv: list[str]) -> tuple[str, str, list[str]]:
    """(app, subcommand, the subcommand's arguments) of ``celery -A app <sub> ...``."""
    apps = option_values(argv, "-A", "--app")
    assert apps, f"{name}: celery without -A/--app"
    flags = {
        opt
        for param in celery_cli.params
        if getattr(param, "is_flag", False)
        for opt in (*param.opts, *param.secondary_opts)
    }
    rest = argv[1:]
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        i += 1 if "=" in rest[i] or rest[i] in flags else 2
    assert i < len(rest), f"{name}: celery without a subcommand"
    return apps[0], rest[i], rest[i + 1 :]


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
    for argv in steps(name, services[name]):
        program = argv[0]
        executable = VENV_BIN / program
        assert executable.is_file() and os.access(executable, os.X_OK), (
            f"{name}: {program!r} is not installed in the virtual environment ({VENV_BIN})"
        )
        if program == "python":
            assert argv[1:2] == ["manage.py"] and len(argv) > 2, (
                f"{name}: python runs only `manage.py <command>` here, not {argv[1:]}"
            )
            assert (ROOT / "manage.py").is_file(), f"{name}: manage.py is missing"
            assert argv[2] in get_commands(), (
                f"{name}: {argv[2]!r} is not a Django management command"
            )
        elif program == "celery":
            app_name, sub, args = celery_parts(name, argv)
            importlib.import_module("aibox.celery")
            try:
                app = find_app(app_name)
            except (ImportError, AttributeError) as exc:
                pytest.fail(f"{name}: -A {app_name} does not import: {exc}")
            assert isinstance(app, Celery), f"{name}: -A {app_name} is not a Celery app"
            assert sub in {"worker", "beat"}, f"{name}: celery {sub!r} is not a service"
            bad = unknown_options(args, click_options(celery_cli, celery_cli.commands[sub]))
            assert not bad, f"{name}: celery {sub} has no options {bad}"
        elif program == "uvicorn":
            module_name, _, attribute = argv[1].partition(":")
            assert attribute, f"{name}: uvicorn target {argv[1]!r} is not module:attribute"
            application = getattr(importlib.import_module(module_name), attribute, None)
            assert callable(application), f"{name}: {argv[1]} is not an ASGI callable"
            # `uvicorn.main` the attribute is the function; the module holds the click command.
            uvicorn_cli = importlib.import_module("uvicorn.main").main
            bad = unknown_options(argv[2:], click_options(uvicorn_cli))
            assert not bad, f"{name}: uvicorn has no options {bad}"
            assert option_values(argv, "--host") == ["0.0.0.0"], (  # noqa: S104 - in a container
                f"{name}: uvicorn must listen on 0.0.0.0 inside a container"
            )
            port = option_values(argv, "--port")
            published = [str(p).rsplit(":", 1)[-1] for p in services[name].get("ports") or []]
            assert port and port[0] in published, (
                f"{name}: uvicorn's port {port} is not among the published ports {published}"
            )
        else:
            pytest.fail(f"{name}: no check for the program {program!r}; add one to this test")


def test_workers_consume_the_routed_and_default_queues(services):
    consumed_by_default: set[str] = set()  # by services that start without a profile
    consumed: set[str] = set()
    hostnames: dict[str, str] = {}
    beats = []
    for name, argvs in all_steps(services).items():
        for argv in argvs:
            if argv[0] != "celery":
                continue
            _, sub, args = celery_parts(name, argv)
            if sub == "beat":
                beats.append(name)
                continue
            queues = [
                q for value in option_values(args, "-Q", "--queues") for q in value.split(",")
            ]
            assert queues, f"{name}: a worker should name its queues (--queues)"
            bad = [q for q in queues if not QUEUE_NAME.match(q)]
            assert not bad, f"{name}: odd queue names {bad}"
            consumed |= set(queues)
            if not services[name].get("profiles"):
                consumed_by_default |= set(queues)
            for hostname in option_values(args, "-n", "--hostname"):
                assert hostname not in hostnames, (
                    f"{name}: worker node name {hostname!r} is also {hostnames[hostname]}'s"
                )
                hostnames[hostname] = name
    # Tasks without a route go to the default queue: a default `up` must consume it.
    default_queue = find_app("aibox").conf.task_default_queue
    assert default_queue in consumed_by_default, (
        f"no worker started by default consumes the default queue {default_queue!r}"
    )
    routes = getattr(settings, "CELERY_TASK_ROUTES", None) or {}
    routed = (
        {r["queue"] for r in routes.values() if isinstance(r, dict) and "queue" in r}
        if isinstance(routes, dict)
        else set()
    )
    assert routed <= consumed, f"queues {sorted(routed - consumed)} have routes but no worker"
    # Two beats would enqueue every periodic task twice.
    assert len(beats) == 1, f"exactly one service should run celery beat, not {beats}"


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
