"""docs/audit-verification.md's stand-alone script, run as an outside auditor would:
a separate Python process with only the standard library and cryptography."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from apps.accounts.models import Role
from apps.audit import signing
from apps.audit.services import audit_record
from tests.conftest import client_for

DOC = Path(settings.BASE_DIR) / "docs" / "audit-verification.md"


@pytest.fixture
def script(tmp_path) -> Path:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path / "verify_aibox_export.py"
    path.write_text(code)
    return path


def run(script: Path, export: Path, key: Path) -> subprocess.CompletedProcess:
    # -I: isolated mode, so nothing of AIBox (or this checkout) is importable.
    return subprocess.run(
        [sys.executable, "-I", str(script), str(export), str(key)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "pdf"])
def test_outsider_script_verifies_and_catches_tampering(users, script, tmp_path, fmt):
    admin = users[Role.ADMIN]
    for i in range(12):
        audit_record(actor=admin, action="test.doc", target_label=f"=cmd|{i}", details={"i": i})
    client = client_for(users[Role.COMPLIANCE_OFFICER])
    data = b"".join(client.post(f"/audit/export.{fmt}").streaming_content)
    key = tmp_path / "key.pem"
    key.write_text(signing.public_key().pem)
    export = tmp_path / f"export.{fmt}"
    export.write_bytes(data)

    ok = run(script, export, key)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stdout + ok.stderr

    lines = data.splitlines(keepends=True)
    if fmt == "pdf":
        tampered = data.replace(b"/Author (AIBox)", b"/Author (AIBoy)")
        assert tampered != data
    else:
        tampered = b"".join(lines[:3] + lines[4:])  # one event removed
    export.write_bytes(tampered)
    bad = run(script, export, key)
    assert bad.returncode == 1
    assert "content sha256 differs from the manifest" in bad.stdout
    if fmt != "pdf":
        assert "11 events, the manifest says 12" in bad.stdout
        assert "events missing before" in bad.stdout
