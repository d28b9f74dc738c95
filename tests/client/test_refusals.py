"""What the box refuses reaches the caller with the box's own words: as an exception
from the client, and from ``aibox`` as the message on stderr and a documented exit code."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
from aibox_client import AIBox, BadRequest, NotFound, PermissionDenied
from aibox_client.cli import EXIT_AUTH, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_USAGE, cli
from click.testing import CliRunner

from apps.accounts.models import Role
from tests.client.conftest import run_aibox

pytestmark = pytest.mark.django_db

ROLE_REFUSAL = "Your role does not allow this action."


def test_an_app_developers_key_is_refused_where_its_role_may_not_go(box, client_for):
    devon: AIBox = client_for(Role.APP_DEVELOPER)
    assert devon.me()["role"] == Role.APP_DEVELOPER
    with pytest.raises(PermissionDenied) as refused:
        devon.create_dataset("devons-data", licence="mit")
    assert refused.value.status == 403 and refused.value.message == ROLE_REFUSAL
    with pytest.raises(PermissionDenied) as refused:
        devon.audit_export(format="jsonl")
    assert refused.value.message == ROLE_REFUSAL

    # The command line: a real process, then CliRunner with --json.
    result = run_aibox(box, Role.APP_DEVELOPER, "datasets", "create", "devons", "--licence", "mit")
    assert result.returncode == EXIT_AUTH == 3
    assert ROLE_REFUSAL in result.stderr and "403" in result.stderr
    runner = CliRunner()
    refused = runner.invoke(cli, ["--json", "finetunes", "list"], env=box.env(Role.APP_DEVELOPER))
    assert refused.exit_code == EXIT_AUTH
    assert json.loads(refused.stderr)["error"] == {
        "status": 403,
        "message": ROLE_REFUSAL,
        "type": "PermissionDenied",
    }


def test_a_data_scientists_key_may_not_deploy(box, client_for):
    with pytest.raises(PermissionDenied) as refused:
        client_for(Role.DATA_SCIENTIST).create_deployment("mine", model_version=box.gemma)
    assert refused.value.message  # the box's reason (role or scope), not a bare status


def test_a_bad_file_is_refused_with_the_servers_reason(box, client_for, tmp_path):
    dana: AIBox = client_for(Role.DATA_SCIENTIST)
    dana.create_dataset("client-refusals", licence="cc0-1.0")
    pickled = tmp_path / "rows.pkl"
    pickled.write_bytes(pickle.dumps([{"text": "hi"}]))
    with pytest.raises(BadRequest) as refused:
        dana.upload_dataset_version("client-refusals", pickled)
    assert refused.value.status == 400 and "pickle" in refused.value.message.lower()
    assert dana.dataset("client-refusals")["versions"] == []  # nothing kept

    binary = tmp_path / "rows.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    result = run_aibox(
        box, Role.DATA_SCIENTIST, "datasets", "upload", "client-refusals", str(binary)
    )
    assert result.returncode == EXIT_REFUSED == 1
    assert result.stderr.startswith("Error (400): ") and len(result.stderr) > 20

    # A model file that is not GGUF, through the CLI's JSON errors.
    runner = CliRunner()
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    admin_env = box.env(Role.ADMIN)
    runner.invoke(cli, ["models", "create", "client-fake", "--licence", "mit"], env=admin_env)
    refused = runner.invoke(
        cli, ["--json", "models", "upload", "client-fake", str(fake)], env=admin_env
    )
    assert refused.exit_code == EXIT_REFUSED
    error = json.loads(refused.stderr)["error"]
    assert error["status"] == 400 and "GGUF" in error["message"]


def test_not_found_and_bad_keys(box, client_for):
    with pytest.raises(NotFound):
        client_for(Role.ADMIN).deployment("no-such-deployment")
    result = run_aibox(box, Role.ADMIN, "deployments", "show", "no-such-deployment")
    assert result.returncode == EXIT_NOT_FOUND == 4
    assert "Error (404)" in result.stderr

    wrong = run_aibox(box, Role.ADMIN, "whoami", AIBOX_API_KEY="aibox_nope_nope")
    assert wrong.returncode == EXIT_AUTH
    assert "401" in wrong.stderr

    usage = run_aibox(box, Role.ADMIN, "deployments", "scale", "x", "many")
    assert usage.returncode == EXIT_USAGE == 2


def test_login_writes_a_private_config_and_an_open_one_is_refused(box, tmp_path):
    config = tmp_path / "aibox" / "config.toml"
    env = {"AIBOX_CONFIG": str(config), "AIBOX_URL": "", "AIBOX_API_KEY": ""}
    key = box.keys[Role.DATA_SCIENTIST]
    runner = CliRunner()
    login = runner.invoke(
        cli, ["login", "--url", box.url, "--api-key-stdin"], input=key + "\n", env=env
    )
    assert login.exit_code == 0, login.output
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert key in config.read_text()

    # Later commands read it: no environment needed.
    whoami = runner.invoke(cli, ["--json", "whoami"], env=env)
    assert whoami.exit_code == 0, whoami.output
    assert json.loads(whoami.output)["username"] == "client-data_scientist"

    os.chmod(config, 0o644)
    refused = runner.invoke(cli, ["whoami"], env=env)
    assert refused.exit_code == EXIT_USAGE
    assert "Refusing to read" in refused.stderr and "chmod 600" in refused.stderr

    nothing = runner.invoke(cli, ["whoami"], env={**env, "AIBOX_CONFIG": str(tmp_path / "none")})
    assert nothing.exit_code == EXIT_USAGE and "aibox login" in nothing.stderr
