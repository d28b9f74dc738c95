import csv
import io
import json
import re
import stat
from urllib.parse import parse_qsl

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.accounts.models import Role
from apps.audit import signing
from apps.audit.models import AuditEvent, Outcome
from apps.audit.services import audit_record
from apps.audit.verification import verify_export
from tests.conftest import client_for


@pytest.fixture
def log(users):
    actor = users[Role.ADMIN]
    for i in range(30):
        audit_record(
            actor=actor,
            action="model.upload" if i % 2 else "user.update",
            outcome=Outcome.FAILURE if i % 10 == 0 else Outcome.SUCCESS,
            details={"n": i},
        )
    return users


def download(user, url: str) -> bytes:
    """POST the export form (the filters it carries are the page's query string)."""
    path, _, query = url.partition("?")
    response = client_for(user).post(path, dict(parse_qsl(query)))
    assert response.status_code == 200, response.content[:300]
    assert response.streaming, "exports stream"
    return b"".join(response.streaming_content)


def check(data: bytes):
    return verify_export(data, public_key=signing.public_key().raw)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "pdf"])
def test_export_verifies_and_is_audited(log, fmt, tmp_path, capsys):
    officer = log[Role.COMPLIANCE_OFFICER]
    data = download(officer, f"/audit/export.{fmt}")
    report = check(data)
    assert report.ok, report.problems
    manifest = report.manifest
    assert manifest["events"] == 30 and manifest["chain_ok"] is True
    assert manifest["first_event"]["seq"] == 1 and manifest["last_event"]["seq"] == 30
    assert manifest["last_event"]["hash"] == AuditEvent.objects.get(seq=30).hash
    assert manifest["public_key_sha256"] == signing.public_key().fingerprint
    # Producing it is an audit event, after the exported range.
    event = AuditEvent.objects.get(action="audit.export")
    assert event.actor_label == "cora" and event.seq == 31
    assert event.details["format"] == fmt

    path = tmp_path / f"export.{fmt}"
    path.write_bytes(data)
    call_command("audit_verify_export", str(path))
    out = capsys.readouterr().out
    assert "OK" in out and "events: 30" in out


def test_signing_key_is_created_private(log, settings):
    download(log[Role.ADMIN], "/audit/export.jsonl")
    mode = settings.AUDIT_SIGNING_KEY_FILE.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    page = client_for(log[Role.ADMIN]).get("/audit/").content.decode()
    assert signing.public_key().fingerprint in page
    assert "PRIVATE KEY" not in page


def test_filtered_export_lists_matches_and_verifies_the_whole_range(log):
    data = download(log[Role.ADMIN], "/audit/export.jsonl?action=user.&outcome=failure")
    report = check(data)
    assert report.ok, report.problems
    events = [json.loads(line) for line in lines(data)[:-1]]
    assert [e["seq"] for e in events] == [1, 11, 21]
    assert report.manifest["filters"] == {"action": "user.", "outcome": "failure"}
    # The chain was checked over every event from the first match to the last.
    assert report.manifest["verified_range"]["first_seq"] == 1
    assert report.manifest["verified_range"]["last_seq"] == 21
    assert report.manifest["verified_range"]["events_checked"] == 21


def test_empty_export_is_still_signed(log):
    data = download(log[Role.ADMIN], "/audit/export.csv?actor=nobody")
    report = check(data)
    assert report.ok, report.problems
    assert report.manifest["events"] == 0 and report.manifest["first_event"] is None


def test_invalid_filter_is_a_400(log):
    response = client_for(log[Role.ADMIN]).post("/audit/export.csv", {"since": "yesterday"})
    assert response.status_code == 400
    assert b"since: Enter a valid date/time." in response.content
    assert not AuditEvent.objects.filter(action="audit.export").exists()


def _problems(data: bytes) -> str:
    report = check(data)
    assert not report.ok
    return " | ".join(report.problems)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_tampered_exports_fail_naming_the_problem(log, fmt):
    data = download(log[Role.ADMIN], f"/audit/export.{fmt}")
    rows = lines(data)
    header = 1 if fmt == "csv" else 0
    row_of = {seq: header + seq - 1 for seq in range(1, 31)}  # event #seq's line index

    # One byte changed inside event #5.
    changed = list(rows)
    changed[row_of[5]] = changed[row_of[5]].replace(b":4}", b":7}")
    problems = _problems(b"".join(changed))
    assert "sha256 differs from the signed manifest" in problems
    assert "event #5: its contents do not match its hash" in problems

    # One line removed.
    removed = rows[: row_of[12]] + rows[row_of[12] + 1 :]
    problems = _problems(b"".join(removed))
    assert "event(s) #12..#12 missing before it" in problems
    assert "the file holds 29 events, the signed manifest says 30" in problems

    # Two lines swapped.
    swapped = list(rows)
    swapped[row_of[7]], swapped[row_of[8]] = swapped[row_of[8]], swapped[row_of[7]]
    problems = _problems(b"".join(swapped))
    assert "event #7: out of order (comes after event #8)" in problems

    # The manifest itself edited (an attacker "fixing" the count).
    trailer = re.sub(rb'events("+):30', rb"events\1:29", rows[-1])
    assert trailer != rows[-1]
    problems = _problems(b"".join(removed[:-1] + [trailer]))
    assert "the signature does not verify" in problems

    # Cut short: the manifest line is gone.
    problems = _problems(b"".join(rows[:-1]))
    assert "the last line is not an AIBox manifest" in problems


def test_tampered_pdf_fails(log):
    data = bytearray(download(log[Role.ADMIN], "/audit/export.pdf"))
    data[200] ^= 0x01
    assert "sha256 differs from the signed manifest" in _problems(bytes(data))


def test_verify_command_names_the_problem(log, tmp_path):
    data = download(log[Role.ADMIN], "/audit/export.jsonl")
    path = tmp_path / "export.jsonl"
    rows = lines(data)
    path.write_bytes(b"".join(rows[:3] + rows[4:]))
    with pytest.raises(CommandError, match="verification FAILED") as excinfo:
        call_command("audit_verify_export", str(path))
    assert "event(s) #4..#4 missing before it" in str(excinfo.value)
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("audit_verify_export", str(tmp_path / "absent.csv"))


def test_another_key_does_not_verify(log, tmp_path):
    data = download(log[Role.ADMIN], "/audit/export.csv")
    other = tmp_path / "other.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    path = tmp_path / "export.csv"
    path.write_bytes(data)
    with pytest.raises(CommandError, match="signature does not verify"):
        call_command("audit_verify_export", str(path), public_key=str(other))


def test_csv_escapes_formula_cells(users):
    attacker = users[Role.DATA_SCIENTIST]
    for text in ['=HYPERLINK("http://evil")', "+1+1", "-2", "@SUM(A1)", "\tx", "'quoted"]:
        audit_record(actor=attacker, action="test.csv", target_label=text, target_id=text)
    data = download(users[Role.COMPLIANCE_OFFICER], "/audit/export.csv")
    rows = list(csv.reader(io.StringIO(data.decode())))[1:-1]
    labels = [row[6] for row in rows]
    assert labels == [
        '\'=HYPERLINK("http://evil")',
        "'+1+1",
        "'-2",
        "'@SUM(A1)",
        "'\tx",
        "''quoted",
    ]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t")) for row in rows for cell in row)
    # The escaping is undone by the verifier, so every hash still checks.
    assert check(data).ok


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER])
def test_other_roles_never_see_the_audit_log(log, role):
    client = client_for(log[role])
    for url in ["/audit/", "/audit/public-key.pem"]:
        assert client.get(url).status_code == 403, url
    for url in ["/audit/export.csv", "/audit/export.pdf"]:
        assert client.post(url).status_code == 403, url
    assert "/audit/" not in client.get("/").content.decode()
    assert not AuditEvent.objects.filter(action="audit.export").exists()


@pytest.mark.parametrize("role", [Role.ADMIN, Role.COMPLIANCE_OFFICER])
def test_readers_see_the_audit_link(log, role):
    assert 'href="/audit/"' in client_for(log[role]).get("/").content.decode()
