"""A compliance officer filters the audit log, exports a PDF and a CSV, and downloads the
period report, in Chromium. The PDFs are rendered to images and read back with OCR, so
the check is on what a person opening them would see."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pypdfium2
import pytesseract
import pytest
from django.utils import timezone
from playwright.sync_api import expect

from apps.accounts.models import Role
from apps.audit import signing
from apps.audit.models import AuditEvent, Outcome
from apps.audit.services import audit_record
from apps.audit.verification import verify_export
from tests.conftest import PASSWORD, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def ocr_first_page(data: bytes) -> str:
    pdf = pypdfium2.PdfDocument(data)
    image = pdf[0].render(scale=3).to_pil()
    return " ".join(pytesseract.image_to_string(image).split())


def download(page, button_name: str) -> bytes:
    with page.expect_download() as info:
        page.get_by_role("button", name=button_name).click()
    return open(info.value.path(), "rb").read()  # noqa: SIM115, PTH123


def test_officer_filters_exports_and_downloads_the_report(page):
    make_user(Role.COMPLIANCE_OFFICER, username="cora")
    admin = make_user(Role.ADMIN, username="ada")
    for i in range(9):
        audit_record(
            actor=admin,
            action="deployment.start" if i % 3 == 0 else "model_version.create",
            outcome=Outcome.FAILURE if i == 6 else Outcome.SUCCESS,
            details={"i": i},
        )

    page.goto("/login/")
    page.get_by_label("Username").fill("cora")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("navigation").get_by_role("link", name="Audit log").click()
    expect(page.locator(".fingerprint")).to_have_text(signing.public_key().fingerprint)

    page.get_by_label("Action").fill("deployment.")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.audit tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("deployment.start")

    pdf = download(page, "PDF report")
    report = verify_export(pdf, public_key=signing.public_key().raw)
    assert report.ok, report.problems
    text = ocr_first_page(pdf)
    assert "Audit log export" in text
    assert "Events: 3" in text
    assert "Chain verified" in text

    data = download(page, "CSV")
    assert verify_export(data, public_key=signing.public_key().raw).ok
    exported = list(csv.reader(io.StringIO(data.decode())))[1:-1]
    assert [row[3] for row in exported] == ["deployment.start"] * 3
    assert [row[7] for row in exported] == ["success", "success", "failure"]

    page.get_by_role("link", name="Compliance report for a period").click()
    now = timezone.now()
    page.get_by_label("From (UTC)").fill((now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"))
    page.get_by_label("Until (UTC)").fill((now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"))
    with page.expect_download() as info:
        page.get_by_role("button", name="Download PDF").click()
    report_pdf = open(info.value.path(), "rb").read()  # noqa: SIM115, PTH123
    assert verify_export(report_pdf, public_key=signing.public_key().raw).ok
    text = ocr_first_page(report_pdf)
    assert "Compliance report" in text
    # The period's events: the 9 above, the officer's login, her two exports and this
    # report (recorded before it is built).
    assert "Audit events in period 13" in text, text[:400]

    assert list(
        AuditEvent.objects.filter(actor_label="cora")
        .exclude(action="auth.login")
        .order_by("seq")
        .values_list("action", flat=True)
    ) == ["audit.export", "audit.export", "audit.report"]
