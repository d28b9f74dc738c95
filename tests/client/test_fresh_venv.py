"""The client installs on its own: a fresh virtual environment with only ``./client``
(and its few pinned dependencies) has neither Django nor llama.cpp, runs ``aibox``, and
drives the live box from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apps.accounts.models import Role
from tests.client.conftest import ROOT, TRAIN_ROWS

pytestmark = pytest.mark.django_db

PYTHON = "python3.11" if sys.version_info[:2] == (3, 11) else sys.executable


def run(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    # Nothing of the project's own path leaks in: only what the venv installed is there.
    env = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, **kwargs)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    path = tmp_path_factory.mktemp("client-venv") / "venv"
    made = run(PYTHON, "-m", "venv", str(path))
    assert made.returncode == 0, made.stderr
    installed = run(
        str(path / "bin" / "pip"),
        "install",
        "--quiet",
        "--disable-pip-version-check",
        str(ROOT / "client"),
    )
    assert installed.returncode == 0, installed.stderr
    return path


def test_the_client_installs_alone_and_drives_the_box(venv, box, tmp_path):
    python = str(venv / "bin" / "python")
    for module in ("django", "llama_cpp", "apps", "workers"):
        probe = run(python, "-c", f"import {module}", cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    helped = run(str(venv / "bin" / "aibox"), "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "Exit codes" in helped.stdout

    # From the fresh environment: the library in a script, then the command.
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TRAIN_ROWS[:2]))
    script = f"""
import json, sys
from aibox_client import AIBox, PermissionDenied
box = AIBox({box.url!r}, {box.keys[Role.DATA_SCIENTIST]!r}, progress=False)
box.create_dataset("client-venv", licence="cc0-1.0")
version = box.upload_dataset_version("client-venv", {str(data)!r}, wait=True)
developer = AIBox({box.url!r}, {box.keys[Role.APP_DEVELOPER]!r})
try:
    developer.datasets()
except PermissionDenied as exc:
    refusal = exc.message
print(json.dumps({{"state": version["state"], "rows": version["rows"], "refusal": refusal}}))
"""
    result = run(python, "-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "state": "valid",
        "rows": 2,
        "refusal": "Your role does not allow this action.",
    }
    listed = run(
        str(venv / "bin" / "aibox"),
        "--json",
        "datasets",
        "list",
        cwd=tmp_path,
        env=box.env(Role.DATA_SCIENTIST),
    )
    assert listed.returncode == 0, listed.stderr
    assert "client-venv" in {d["name"] for d in json.loads(listed.stdout)}
