"""Checks shared by the deployment tests (docker-compose.yml, deploy/kubernetes/).

Each deployment names commands, variables and queues; these helpers check them against
the code and the virtual environment, so that a typo surfaces in the test suite and not
on a production host. They fail the calling test with a message naming the service.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

import click
import pytest
from celery import Celery
from celery.app.utils import find_app
from celery.bin.celery import celery as celery_cli
from django.conf import settings
from django.core.management import CommandError, get_commands, load_command_class

from apps.finetune.services import TRAINING_QUEUE
from apps.optimise.services import OPTIMISE_QUEUE

ROOT = Path(__file__).resolve().parents[2]
# The virtual environment the tests run in is the project's.
VENV_BIN = Path(sys.executable).parent
# What every app process needs to start (aibox/settings.py has defaults for the rest, but
# those defaults point at 127.0.0.1 and the project directory, wrong in a container).
REQUIRED_ENV = ("AIBOX_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "AIBOX_ARTIFACT_ROOT")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def command_steps(name: str, command: str | list[str] | None) -> list[list[str]]:
    """A command as argv lists: one per ``&&`` step of an ``sh -c`` script."""
    assert command, f"{name}: no command"
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


def check_program(name: str, argv: list[str], *, ports: Iterable[str]) -> None:
    """One command step runs an installed program on a target that exists.

    ``ports``: where the container's port is published (Compose) or exposed (a
    Kubernetes containerPort); uvicorn must listen on one of them.
    """
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
        commands = get_commands()
        assert argv[2] in commands, f"{name}: {argv[2]!r} is not a Django management command"
        parser = load_command_class(commands[argv[2]], argv[2]).create_parser("manage.py", argv[2])
        try:
            _, unknown = parser.parse_known_args(argv[3:])
        except (CommandError, SystemExit) as exc:
            pytest.fail(f"{name}: manage.py {argv[2]} refuses {argv[3:]}: {exc}")
        assert not unknown, f"{name}: manage.py {argv[2]} has no options {unknown}"
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
        ports = [str(p) for p in ports]
        assert port and port[0] in ports, (
            f"{name}: uvicorn's port {port} is not among the container's ports {ports}"
        )
    else:
        pytest.fail(f"{name}: no check for the program {program!r}; add one to this test")


def check_queues(commands: dict[str, list[list[str]]], *, started_by_default: set[str]) -> None:
    """Workers consume the default queue and every routed one; exactly one beat runs.

    ``commands``: each service's command steps; ``started_by_default``: the services a
    plain start runs (not those behind a Compose profile).
    """
    consumed_by_default: set[str] = set()
    consumed: set[str] = set()
    hostnames: dict[str, str] = {}
    beats = []
    for name, argvs in commands.items():
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
            if name in started_by_default:
                consumed_by_default |= set(queues)
            for hostname in option_values(args, "-n", "--hostname"):
                assert hostname not in hostnames, (
                    f"{name}: worker node name {hostname!r} is also {hostnames[hostname]}'s"
                )
                hostnames[hostname] = name
    # Tasks without a route go to the default queue: a default start must consume it.
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
    # Fine-tunes and optimise jobs are sent to their queue by name, not by a route.
    routed |= {TRAINING_QUEUE, OPTIMISE_QUEUE}
    assert routed <= consumed, f"queues {sorted(routed - consumed)} have routes but no worker"
    # Two beats would enqueue every periodic task twice.
    assert len(beats) == 1, f"exactly one service should run celery beat, not {beats}"
