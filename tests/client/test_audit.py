"""Signed audit exports through the API, verified by the client: the signature with the
box's Ed25519 key, the content's sha256 and the event chain; a changed byte fails."""

from __future__ import annotations

import json

import pytest
from aibox_client import AIBox
from aibox_client.cli import EXIT_UNVERIFIED, cli
from aibox_client.verify import fingerprint
from click.testing import CliRunner

from apps.accounts.models import Role
from apps.audit.signing import public_key
from tests.client.conftest import run_aibox

pytestmark = pytest.mark.django_db


def test_an_export_verifies_against_the_boxs_key_and_a_changed_one_does_not(box, tmp_path):
    cora = AIBox(box.url, box.keys[Role.COMPLIANCE_OFFICER], progress=False)
    key = cora.audit_public_key()
    assert key["fingerprint"] == public_key().fingerprint == fingerprint(key["pem"])

    for fmt in ("jsonl", "csv"):
        data = cora.audit_export(tmp_path / f"all.{fmt}", format=fmt)
        verification = cora.verify_audit_export(data, key["pem"])
        assert verification.ok, verification.problems
        assert verification.format == fmt and verification.events > 0
    # The export itself is audited.
    exported = cora.audit_events(limit=1, action="audit.export")[0]
    assert "client-compliance_officer" in exported["actor_label"]

    # A filtered view, by the CLI as a real process, verified against a key file kept earlier.
    pem = tmp_path / "box.pem"
    pem.write_text(key["pem"])
    out = tmp_path / "exports.jsonl"
    result = run_aibox(
        box,
        Role.COMPLIANCE_OFFICER,
        "--json",
        "audit",
        "export",
        "--action",
        "audit.export",
        "-o",
        str(out),
        "--verify",
        "--public-key",
        str(pem),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["verified"] is True and summary["events"] >= 2
    assert summary["fingerprint"] == key["fingerprint"] and summary["key_source"] == "file"

    # One changed character in an event: the offline check names it and exits 7.
    lines = out.read_text().splitlines(keepends=True)
    event = json.loads(lines[0])
    event["actor_label"] = "someone-else"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(json.dumps(event) + "\n" + "".join(lines[1:]))
    refused = CliRunner().invoke(
        cli, ["audit", "verify", str(tampered), "--public-key", str(pem)], env=box.env(Role.ADMIN)
    )
    assert refused.exit_code == EXIT_UNVERIFIED == 7
    assert "content's sha256 differs" in refused.stderr
    assert f"Event #{event['seq']}: its contents do not match its hash" in refused.stderr
