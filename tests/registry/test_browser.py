"""In a real browser: a data scientist uploads a GGUF through the model page, watches the
progress bar and lands on the version with its parsed metadata; an admin approves it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from playwright.sync_api import expect

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.registry.models import ModelVersion, State
from tests.conftest import PASSWORD, make_user
from workers.artifacts import file_sha256

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# What a user sees reported is what the upload reports, seen through the page itself.
WATCH_PROGRESS = """
document.addEventListener("DOMContentLoaded", () => {
  const percent = document.getElementById("upload-percent");
  const status = document.getElementById("upload-status");
  if (!percent) return;
  new MutationObserver(() => window.reportProgress(
    percent.textContent, !status.hidden, document.getElementById("upload-progress").value
  )).observe(percent, {childList: true, characterData: true, subtree: true});
});
"""


def write_gguf(path: Path) -> Path:
    """A valid GGUF of a few MB (so the upload takes more than one progress event)."""
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name("browser-test-model")
    writer.add_context_length(512)
    writer.add_block_count(3)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_file_type(0)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(7)
    writer.add_tensor("token_embd.weight", rng.standard_normal((16384, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def context(browser, live_server):
    context = browser.new_context(base_url=live_server.url)
    context.set_default_timeout(30_000)
    yield context
    context.close()


def _login(page, username: str) -> None:
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name=f"Welcome, {username}")).to_be_visible()


def test_upload_with_progress_then_an_admin_approves(browser, live_server, context, tmp_path):
    make_user(Role.DATA_SCIENTIST, username="dana")
    make_user(Role.ADMIN, username="ada")
    file = write_gguf(tmp_path / "browser-model.gguf")
    seen: list[tuple[str, bool, float]] = []
    context.expose_function("reportProgress", lambda *values: seen.append(tuple(values)))
    context.add_init_script(WATCH_PROGRESS)
    page = context.new_page()

    _login(page, "dana")
    page.goto("/registry/")
    page.get_by_label("Name", exact=True).fill("browser-model")
    page.get_by_label("Licence", exact=True).fill("apache-2.0")
    page.get_by_role("button", name="Create model").click()
    expect(page.get_by_role("heading", name="browser-model")).to_be_visible()

    page.get_by_label("GGUF file").set_input_files(file)
    page.get_by_role("button", name="Upload").click()
    # The upload lands on the new version's page.
    expect(page).to_have_url(re.compile(r"/registry/versions/\d+/$"))
    # The progress bar was shown and ran to 100%.
    assert seen, "the progress bar never moved"
    assert all(visible for _, visible, _ in seen)
    assert seen[-1][0] == "100%" and seen[-1][2] == 100

    version = ModelVersion.objects.get(repo__name="browser-model")
    assert version.sha256 == file_sha256(file)
    expect(page.get_by_role("heading", name="browser-model v1")).to_contain_text("Draft")
    facts = {
        "sha256": version.sha256,
        "Architecture": "llama",
        "Context length": "512",
        "Layers": "3",
        "Embedding size": "64",
        "Chat template": "in the file",
    }
    for term, value in facts.items():
        expect(page.locator(f"dt:text-is('{term}') + dd")).to_contain_text(value)
    expect(page.locator("#licence")).to_have_text("apache-2.0")
    # A data scientist may not approve.
    expect(page.get_by_role("button", name="Approve")).to_have_count(0)

    admin = browser.new_context(base_url=live_server.url)
    try:
        admin_page = admin.new_page()
        admin_page.set_default_timeout(30_000)
        _login(admin_page, "ada")
        admin_page.goto(version.get_absolute_url())
        admin_page.get_by_label("Reason").fill("Checked the file and its licence.")
        admin_page.get_by_role("button", name="Approve").click()
        expect(admin_page.get_by_text("browser-model v1 is now Approved.")).to_be_visible()
        expect(admin_page.get_by_role("heading", name="browser-model v1")).to_contain_text(
            "Approved"
        )
        expect(admin_page.get_by_text("Checked the file and its licence.")).to_be_visible()
    finally:
        admin.close()
    version.refresh_from_db()
    assert version.state == State.APPROVED and version.state_changed_by.username == "ada"
    event = AuditEvent.objects.get(action="model_version.approve")
    assert event.details["reason"] == "Checked the file and its licence."
