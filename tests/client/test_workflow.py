"""A data scientist's whole path through the client, on the real stack: upload a dataset
(validated), fine-tune a few steps and follow it to success, have the adapter approved
and deployed, then chat with it through OpenAI's own client; and the same
stack driven through the ``aibox`` command (CliRunner, and a real process)."""

from __future__ import annotations

import json

import pytest
from aibox_client import AIBox
from aibox_client.cli import cli
from click.testing import CliRunner

from apps.accounts.models import Role
from tests.client.conftest import FINETUNE_PARAMS, TRAIN_ROWS, run_aibox

pytestmark = pytest.mark.django_db

ADMIN, DS, DEV, CO = (
    Role.ADMIN,
    Role.DATA_SCIENTIST,
    Role.APP_DEVELOPER,
    Role.COMPLIANCE_OFFICER,
)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_upload_finetune_follow_deploy_and_chat(box, client_for, tmp_path, capsys):
    dana: AIBox = client_for(DS)
    data = tmp_path / "secrets.jsonl"
    write_jsonl(data, TRAIN_ROWS)

    dana.create_dataset("client-secrets", licence="cc-by-4.0", source="written by the test")
    version = dana.upload_dataset_version("client-secrets", data, shape="chat", wait=True)
    assert version["state"] == "valid" and version["valid_rows"] == len(TRAIN_ROWS)
    report = dana.dataset_version(version["id"])["report"]
    assert report["errors"] == []
    rows = dana.dataset_rows(version["id"], count=3)
    assert rows["total"] == len(TRAIN_ROWS) and len(rows["rows"]) == 3
    assert rows["rows"][0]["row"]["messages"][0]["content"].startswith("What is the secret")

    job = dana.create_finetune(
        base_model=box.gemma, dataset_version=version["id"], params=FINETUNE_PARAMS
    )
    assert job["state"] == "queued"
    # Followed with its bar on (what a notebook user sees), then finished.
    job = dana.follow(job["id"], progress=True, timeout=900)
    assert job["state"] == "succeeded" and job["step"] == FINETUNE_PARAMS["max_steps"]
    assert job["train_loss"] is not None and job["history"]
    assert "Fine-tune" in capsys.readouterr().err  # tqdm's bar, on stderr
    adapter = job["adapter"]
    assert dana.model_version(adapter)["state"] == "draft"

    # A compliance officer approves; an admin deploys the adapter on its base.
    client_for(CO).approve_version(adapter, reason="Evaluated by the client test.")
    admin = client_for(ADMIN)
    deployment = admin.create_deployment(
        "client-secrets",
        model_version=box.gemma,
        adapter=adapter,
        context_length=256,
        wait=True,
        timeout=300,
    )
    assert deployment["state"] == "ready" and deployment["adapter"] == adapter

    answer = dana.openai("client-secrets", max_retries=0).chat.completions.create(
        model="client-secrets",
        messages=[{"role": "user", "content": "What is the secret word number 3?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "PAPAYA" in answer.choices[0].message.content
    records = dana.usage(limit=5)
    assert records[0]["deployment_name"] == "client-secrets" and records[0]["outcome"] == "ok"

    # The same stack through the command line: tables for people, JSON for scripts.
    runner = CliRunner()
    env = box.env(DS)
    shown = runner.invoke(cli, ["finetunes", "show", str(job["id"])], env=env)
    assert shown.exit_code == 0, shown.output
    assert "succeeded" in shown.output and "train_loss" in shown.output
    listed = runner.invoke(cli, ["--json", "deployments", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert {"client-secrets"} <= {d["name"] for d in json.loads(listed.output)}
    chat = runner.invoke(
        cli,
        ["chat", "client-secrets", "What is the secret word number 5?", "--max-tokens", "16"],
        env=env,
    )
    assert chat.exit_code == 0, chat.output
    assert chat.output.strip()

    # A real process, as a shell script would run it.
    result = run_aibox(box, ADMIN, "--json", "deployments", "show", "client-secrets")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["adapter"] == adapter and shown["state"] == "ready"
    usage = run_aibox(box, DS, "usage", "--deployment", "client-secrets")
    assert usage.returncode == 0, usage.stderr
    assert "client-secrets" in usage.stdout and "OUTCOME" in usage.stdout


def test_cli_dataset_upload_and_rows(box, tmp_path):
    """The CLI's own upload, with its --wait and the rows view, as JSON."""
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, TRAIN_ROWS[:3])
    runner = CliRunner()
    env = box.env(DS)
    created = runner.invoke(
        cli, ["datasets", "create", "client-cli", "--licence", "cc0-1.0"], env=env
    )
    assert created.exit_code == 0, created.output
    uploaded = runner.invoke(
        cli, ["--json", "datasets", "upload", "client-cli", str(data), "--wait"], env=env
    )
    assert uploaded.exit_code == 0, uploaded.output
    version = json.loads(uploaded.output)
    assert version["state"] == "valid" and version["rows"] == 3
    rows = runner.invoke(cli, ["--json", "datasets", "rows", str(version["id"])], env=env)
    assert rows.exit_code == 0, rows.output
    assert json.loads(rows.output)["total"] == 3
    table = runner.invoke(cli, ["datasets", "show", "client-cli"], env=env)
    assert table.exit_code == 0 and "valid" in table.output and "chats.jsonl" in table.output
