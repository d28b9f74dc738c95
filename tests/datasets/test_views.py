"""The dataset pages through Django's test client: who sees what, the forms, htmx fragments.

These tests only render pages, so a version is validated here, in this process
(``dataset_version_validate``); validation on the Celery worker is covered by test_api.py.
Their rows are never committed, so no job reaches the worker.
"""

from __future__ import annotations

import csv
import io
import re

import pytest

from apps.accounts.models import Role, User
from apps.audit.models import AuditEvent
from apps.datasets.models import Dataset, DatasetTransform, DatasetVersion, SourceKind, State
from apps.datasets.services import dataset_create, dataset_version_ingest, dataset_version_validate
from apps.registry.artifacts import artifact_store
from tests.conftest import client_for, make_user
from tests.datasets.conftest import CHAT_ROWS, jsonl

pytestmark = pytest.mark.django_db

QA_ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(25)]


def add_version(
    user: User, dataset: Dataset, rows: list, *, validate: bool = True
) -> DatasetVersion:
    """A version as an upload makes it; validated here unless asked not to be."""
    version = dataset_version_ingest(
        actor=user,
        dataset=dataset,
        staged=artifact_store().stage_chunks([jsonl(rows)]),
        file_name="rows.jsonl",
        source_kind=SourceKind.UPLOAD,
        source={"via": "test"},
    )
    if validate:
        version = dataset_version_validate(version_id=version.pk)
    return version


@pytest.fixture
def dora(db) -> User:
    return make_user(Role.DATA_SCIENTIST, username="dora")


@pytest.fixture
def doras(dora) -> Dataset:
    return dataset_create(actor=dora, name="dora-notes", licence="cc0-1.0")


def test_data_scientists_see_only_their_own_datasets(users, dataset, doras, dora):
    version = add_version(dora, doras, CHAT_ROWS)
    dana = client_for(users[Role.DATA_SCIENTIST])
    listing = dana.get("/datasets/").content.decode()
    assert 'href="/datasets/support-chats/"' in listing
    assert "dora-notes" not in listing and "You see the datasets you own." in listing

    assert dana.get("/datasets/dora-notes/").status_code == 404
    assert dana.get(f"/datasets/versions/{version.pk}/").status_code == 404
    assert dana.get(f"/datasets/versions/{version.pk}/rows").status_code == 404
    assert dana.post(f"/datasets/versions/{version.pk}/export.csv").status_code == 404
    assert client_for(dora).get(f"/datasets/versions/{version.pk}/").status_code == 200


def test_compliance_officers_see_all_export_and_change_nothing(users, dataset, doras, dora):
    version = add_version(dora, doras, CHAT_ROWS)
    assert version.state == State.VALID, version.state_reason
    cora = client_for(users[Role.COMPLIANCE_OFFICER])

    listing = cora.get("/datasets/").content.decode()
    assert "support-chats" in listing and "dora-notes" in listing
    assert "New dataset" not in listing

    dataset_page = cora.get("/datasets/dora-notes/").content.decode()
    assert f'href="/datasets/versions/{version.pk}/"' in dataset_page
    assert 'id="upload-form"' not in dataset_page and 'id="import-hf"' not in dataset_page
    owners_page = client_for(dora).get("/datasets/dora-notes/").content.decode()
    assert 'id="upload-form"' in owners_page  # the owner has the form the officer has not

    version_page = cora.get(f"/datasets/versions/{version.pk}/").content.decode()
    assert 'id="derive"' not in version_page and "/derive/" not in version_page
    assert (
        'id="derive"' in client_for(dora).get(f"/datasets/versions/{version.pk}/").content.decode()
    )

    (action,) = re.findall(
        r'action="([^"]+)">[^<]*<input[^>]*csrf[^>]*><button[^>]*>Export valid', version_page
    )
    export = cora.post(action)
    assert export.status_code == 200 and export["Content-Type"] == "text/csv"
    assert export["Content-Disposition"] == 'attachment; filename="dora-notes-v1.csv"'
    rows = list(csv.reader(io.StringIO(b"".join(export.streaming_content).decode())))
    assert len(rows) == 1 + len(CHAT_ROWS)
    exported = AuditEvent.objects.get(action="dataset_version.export")
    assert exported.actor_label == "cora" and exported.details["rows"] == len(CHAT_ROWS)


def test_app_developers_are_turned_away(users, dataset):
    version = add_version(users[Role.DATA_SCIENTIST], dataset, CHAT_ROWS)
    devon = client_for(users[Role.APP_DEVELOPER])
    for url in (
        "/datasets/",
        f"/datasets/{dataset.name}/",
        f"/datasets/versions/{version.pk}/",
        f"/datasets/versions/{version.pk}/rows",
    ):
        assert devon.get(url).status_code == 403, url
    assert devon.post(f"/datasets/versions/{version.pk}/export.csv").status_code == 403


def test_a_split_with_a_bad_fraction_says_why_and_queues_nothing(users, dataset):
    version = add_version(users[Role.DATA_SCIENTIST], dataset, QA_ROWS)
    dana = client_for(users[Role.DATA_SCIENTIST])
    response = dana.post(
        f"/datasets/versions/{version.pk}/derive/split",
        {"validation_fraction": "1.5", "seed": "7"},
        follow=True,
    )
    assert response.redirect_chain == [(f"/datasets/versions/{version.pk}/", 302)]
    page = response.content.decode()
    assert "Ensure this value is less than or equal to 0.999." in page
    assert 'class="msg-error"' in page
    assert not DatasetTransform.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="dataset_transform").exists()


def test_the_rows_url_answers_htmx_with_the_fragment_and_browsers_with_a_page(users, dataset):
    version = add_version(users[Role.DATA_SCIENTIST], dataset, QA_ROWS)
    dana = client_for(users[Role.DATA_SCIENTIST])
    url = f"/datasets/versions/{version.pk}/rows?page=2"

    fragment = dana.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert fragment.lstrip().startswith('<div id="preview">') and "<html" not in fragment
    assert "Rows 21–25 of 25" in fragment and "Question 24?" in fragment
    assert "Question 0?" not in fragment

    page = dana.get(url).content.decode()
    assert "<html" in page and f"Rows of {version}" in page and "Question 24?" in page


def test_a_validating_version_shows_progress_then_asks_for_a_reload(users, dataset):
    version = add_version(users[Role.DATA_SCIENTIST], dataset, QA_ROWS, validate=False)
    DatasetVersion.objects.filter(pk=version.pk).update(progress_bytes=version.size // 2)
    dana = client_for(users[Role.DATA_SCIENTIST])
    url = f"/datasets/versions/{version.pk}/"

    page = dana.get(url).content.decode()
    percent = round(100 * (version.size // 2) / version.size)
    assert f'<progress id="validation-progress" max="100" value="{percent}">' in page
    assert f'hx-get="{url}?was=validating"' in page
    assert "Export valid rows as CSV" not in page

    # Polled while still validating: the status block again, still polling.
    poll = dana.get(f"{url}?was=validating", HTTP_HX_REQUEST="true")
    assert "HX-Refresh" not in poll.headers
    fragment = poll.content.decode()
    assert fragment.lstrip().startswith('<div id="version-status"') and "<html" not in fragment
    assert "validation-progress" in fragment

    assert dataset_version_validate(version_id=version.pk).state == State.VALID
    ended = dana.get(f"{url}?was=validating", HTTP_HX_REQUEST="true")
    assert ended.status_code == 200 and ended.headers["HX-Refresh"] == "true"
    assert ended.content == b""

    page = dana.get(url).content.decode()
    assert "validation-progress" not in page and "hx-get" not in page.split('id="preview"')[0]
    assert "usable for training" in page
