"""A data scientist's whole path through the client, on the real stack, as the notebook
in docs/notebooks shows it: upload a dataset (validated), fine-tune a few steps and follow
it to success, evaluate it, have the adapter approved and deployed, then chat with it
through OpenAI's own client; then the ``aibox`` command (CliRunner, and a real process)
on what the notebook made."""

from __future__ import annotations

import json

import nbformat
import pytest
from aibox_client.cli import cli
from click.testing import CliRunner
from nbclient import NotebookClient

from apps.accounts.models import Role
from apps.deployments.models import Deployment
from apps.finetune.models import FineTuneJob
from tests.client.conftest import ROOT, TRAIN_ROWS, run_aibox

pytestmark = pytest.mark.django_db

NOTEBOOK = ROOT / "docs" / "notebooks" / "walkthrough.ipynb"

ADMIN, DS, DEV, CO = (
    Role.ADMIN,
    Role.DATA_SCIENTIST,
    Role.APP_DEVELOPER,
    Role.COMPLIANCE_OFFICER,
)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _cell_text(cell) -> str:
    return "".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for output in cell.get("outputs", [])
    )


def test_walkthrough_notebook_then_the_cli_on_what_it_made(box, monkeypatch, tmp_path):
    # docs/notebooks/walkthrough.ipynb, top to bottom in a real Jupyter kernel (nbclient):
    # the data scientist's path through the client, as the docs show it. The kernel is a
    # child process: it reads the box and the keys from its environment.
    monkeypatch.setenv("AIBOX_URL", box.url)
    monkeypatch.setenv("AIBOX_API_KEY", box.keys[DS])
    monkeypatch.setenv("AIBOX_ADMIN_API_KEY", box.keys[ADMIN])
    monkeypatch.setenv("AIBOX_WALKTHROUGH_STEPS", "4")
    monkeypatch.setenv("AIBOX_CONFIG", str(tmp_path / "none.toml"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    cells = [_cell_text(cell) for cell in notebook.cells if cell.cell_type == "code"]
    _, uploaded, report, tuned, evaluated, deployed, chat, usage = cells
    assert "'state': 'valid'" in uploaded and "'error_count': 0" in uploaded
    assert "errors: []" in report and "What is the secret word" in report
    assert "'state': 'succeeded'" in tuned and "'step': 4" in tuned
    assert "Fine-tune" in tuned and "loss=" in tuned  # follow()'s bar, with the loss
    assert "'state': 'succeeded'" in evaluated
    assert " ready revision 1" in deployed
    assert "PAPAYA" in chat
    assert "'outcome': 'ok'" in usage
    name = deployed.split()[0]
    job = FineTuneJob.objects.latest("created_at")
    adapter = job.adapter_id
    assert Deployment.objects.get(name=name).adapter_id == adapter

    # The same stack through the command line: tables for people, JSON for scripts.
    runner = CliRunner()
    env = box.env(DS)
    shown = runner.invoke(cli, ["finetunes", "show", str(job.pk)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "succeeded" in shown.output and "train_loss" in shown.output
    listed = runner.invoke(cli, ["--json", "deployments", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert {name} <= {d["name"] for d in json.loads(listed.output)}
    chat = runner.invoke(
        cli,
        ["chat", name, "What is the secret word number 5?", "--max-tokens", "16"],
        env=env,
    )
    assert chat.exit_code == 0, chat.output
    assert chat.output.strip()

    # A real process, as a shell script would run it.
    result = run_aibox(box, ADMIN, "--json", "deployments", "show", name)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["adapter"] == adapter and shown["state"] == "ready"
    usage = run_aibox(box, DS, "usage", "--deployment", name)
    assert usage.returncode == 0, usage.stderr
    assert name in usage.stdout and "OUTCOME" in usage.stdout


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
