"""Datasets through the REST API, validated and derived by a real Celery worker."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.exceptions import ValidationError

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetTransform, DatasetVersion, JobState, State
from apps.datasets.services import check_file_name
from tests.conftest import client_for
from tests.datasets.conftest import CHAT_ROWS, jsonl, upload, wait_validated
from tests.live import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_jsonl_with_bad_lines_is_rejected_with_line_numbers_and_previewed(users, dataset):
    dana = users[Role.DATA_SCIENTIST]
    content = jsonl(
        [
            CHAT_ROWS[0],
            CHAT_ROWS[1],
            '{"messages": [{"role": "user", "content": "unterminated"',
            {"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
            {
                "messages": [
                    {"role": "user", "content": "   "},
                    {"role": "assistant", "content": "y"},
                ]
            },
            CHAT_ROWS[0],
        ]
    )
    response = upload(dana, dataset, "chats.jsonl", content)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "validating" and body["format"] == "jsonl"

    version = wait_validated(body["id"])
    assert version.state == State.REJECTED
    assert not version.trainable
    assert (version.rows, version.valid_rows, version.error_count) == (6, 3, 3)
    assert version.duplicate_rows == 1
    assert "3 rows failed validation" in version.state_reason

    detail = client_for(dana).get(f"/api/v1/dataset-versions/{version.pk}/").json()
    errors = {(e["line"], e["code"]) for e in detail["report"]["errors"]}
    assert errors == {(3, "invalid_json"), (4, "unknown_role"), (5, "empty_content")}
    assert "index" not in detail["report"]

    export = client_for(dana).get(f"/api/v1/dataset-versions/{version.pk}/export.csv")
    assert export.status_code == 400 and "only a valid version" in export.json()["detail"]
    assert not AuditEvent.objects.filter(action="dataset_version.export").exists()

    page = client_for(dana).get(f"/api/v1/dataset-versions/{version.pk}/rows?start=1&count=3")
    rows = page.json()["rows"]
    assert [r["line"] for r in rows] == [2, 3, 4]
    assert rows[0]["row"]["messages"][2]["content"] == "Paris."
    assert rows[1]["error"] and rows[1]["row"] is None

    actions = list(
        AuditEvent.objects.filter(target_type="datasets.datasetversion", target_id=str(version.pk))
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["dataset_version.create", "dataset_version.validated"]


def test_split_and_dedupe_record_their_parent_and_parameters(users, dataset):
    dana = users[Role.DATA_SCIENTIST]
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(40)] + [
        {"prompt": "Question 0?", "completion": "Answer 0."}
    ] * 2
    version = wait_validated(upload(dana, dataset, "qa.jsonl", jsonl(rows)).json()["id"])
    assert version.state == State.VALID and version.duplicate_rows == 2

    client = client_for(dana)
    split = client.post(
        f"/api/v1/dataset-versions/{version.pk}/derive",
        {"operation": "split", "params": {"validation_fraction": 0.25, "seed": 7}},
        content_type="application/json",
    )
    assert split.status_code == 202, split.content
    job = wait_until(
        lambda: (
            DatasetTransform.objects.filter(pk=split.json()["id"])
            .exclude(state__in=[JobState.QUEUED, JobState.RUNNING])
            .first()
        ),
        what="the split finishing",
    )
    assert job.state == JobState.SUCCEEDED, job.reason
    outputs = {v.transformation["part"]: wait_validated(v.pk) for v in job.outputs.all()}
    assert set(outputs) == {"train", "validation"}
    assert outputs["train"].rows + outputs["validation"].rows == 42
    assert outputs["validation"].rows == 10  # 42 × 0.25, rounded
    for part in outputs.values():
        assert part.parent == version and part.state == State.VALID
        assert part.source_kind == "derived"
        assert part.transformation["operation"] == "split"
        assert part.transformation["params"] == {"validation_fraction": 0.25, "seed": 7}

    dedupe = client.post(
        f"/api/v1/dataset-versions/{version.pk}/derive",
        {"operation": "dedupe"},
        content_type="application/json",
    )
    job = wait_until(
        lambda: DatasetTransform.objects.filter(
            pk=dedupe.json()["id"], state=JobState.SUCCEEDED
        ).first(),
        what="the de-duplication finishing",
    )
    (deduped,) = job.outputs.all()
    deduped = wait_validated(deduped.pk)
    assert deduped.rows == 40 and deduped.duplicate_rows == 0
    assert AuditEvent.objects.filter(action="dataset_transform.succeeded").count() == 2


def test_filter_drops_failed_rows_and_personal_data(users, dataset):
    dana = users[Role.DATA_SCIENTIST]
    rows = [
        {"text": "A clean row about gardening."},
        {"text": "Write to jane.doe@example.com for a refund."},
        {"text": ""},
        {"text": "Card 4242 4242 4242 4242 was charged."},
        {"text": "Another clean row."},
    ]
    version = wait_validated(upload(dana, dataset, "notes.jsonl", jsonl(rows)).json()["id"])
    assert version.state == State.REJECTED
    assert version.pii_rows == 2
    pii = version.report["pii"]
    assert pii["email"]["count"] == 1 and "jane.doe@example.com" not in json.dumps(pii)
    assert pii["payment_card"]["count"] == 1 and "4242 4242 4242 4242" not in json.dumps(pii)

    response = client_for(dana).post(
        f"/api/v1/dataset-versions/{version.pk}/derive",
        {"operation": "filter", "params": {"drop_pii": True}},
        content_type="application/json",
    )
    job = wait_until(
        lambda: DatasetTransform.objects.filter(
            pk=response.json()["id"], state=JobState.SUCCEEDED
        ).first(),
        what="the filter finishing",
    )
    (filtered,) = job.outputs.all()
    filtered = wait_validated(filtered.pk)
    assert filtered.state == State.VALID and filtered.trainable
    assert (filtered.rows, filtered.pii_rows) == (2, 0)


def test_csv_with_a_column_mapping_and_formula_cells_escaped_on_export(users, dataset):
    dana = users[Role.DATA_SCIENTIST]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "question", "answer"])
    writer.writerow(["1", '=HYPERLINK("http://evil")', "Fine."])
    writer.writerow(["2", "What is 2+2?", "+4"])
    response = upload(
        dana,
        dataset,
        "qa.csv",
        buffer.getvalue().encode(),
        shape="prompt_completion",
        column_mapping=json.dumps({"prompt": "question", "completion": "answer"}),
    )
    assert response.status_code == 201, response.content
    version = wait_validated(response.json()["id"])
    assert version.state == State.VALID, version.state_reason
    assert version.format == "csv" and version.shape == "prompt_completion"

    export = client_for(dana).get(f"/api/v1/dataset-versions/{version.pk}/export.csv")
    assert export.status_code == 200
    exported = list(csv.reader(io.StringIO(b"".join(export.streaming_content).decode())))
    assert exported[0] == ["prompt", "completion"]
    assert exported[1][0].startswith("'=HYPERLINK")
    assert exported[2][1] == "'+4"
    assert AuditEvent.objects.filter(action="dataset_version.export").exists()


def test_parquet_with_a_mapping(users, dataset, tmp_path):
    dana = users[Role.DATA_SCIENTIST]
    path = tmp_path / "data.parquet"
    table = pa.table({"body": ["First document.", "Second document.", "Third."]})
    pq.write_table(table, path)
    response = upload(
        dana, dataset, "data.parquet", path.read_bytes(), column_mapping='{"text": "body"}'
    )
    version = wait_validated(response.json()["id"])
    assert version.state == State.VALID, version.state_reason
    assert (version.format, version.shape, version.rows) == ("parquet", "text", 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "empty"),
        ("image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
        ("model.pkl", b"\x80\x04K\x01.", "pickle"),
        ("notes.txt", b"hello", "not a supported data file"),
    ],
)
def test_files_that_are_not_data_are_refused_and_nothing_is_kept(
    users, dataset, artifact_root, name, content, message
):
    stored_before = set(artifact_root.glob("sha256/*/*"))
    response = upload(users[Role.DATA_SCIENTIST], dataset, name, content)
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert not DatasetVersion.objects.exists()
    assert set(artifact_root.glob("sha256/*/*")) == stored_before
    assert not list(artifact_root.glob("tmp/incoming-*"))


def test_a_path_in_the_file_name_never_reaches_the_filesystem(users, dataset, artifact_root):
    response = upload(
        users[Role.DATA_SCIENTIST], dataset, "../../etc/passwd.jsonl", b'{"text": "x"}'
    )
    assert response.status_code == 201
    version = DatasetVersion.objects.get(pk=response.json()["id"])
    assert version.file_name == "passwd.jsonl"
    stored = artifact_root / "sha256" / version.sha256[:2] / version.sha256
    assert stored.is_file()
    with pytest.raises(ValidationError, match="must not contain a path"):
        check_file_name("../passwd.jsonl")


def test_not_utf8_mixed_shapes_and_a_huge_line_are_reported_per_line(users, dataset):
    content = (
        jsonl([CHAT_ROWS[0]])
        + '{"text": "caf\u00e9"}\n'.encode("latin-1")
        + jsonl([{"prompt": "p", "completion": "c"}])
        + b'{"messages": "'
        + b"x" * (50 * 1024 * 1024)
        + b'"}\n'
        + jsonl([CHAT_ROWS[1]])
    )
    response = upload(users[Role.DATA_SCIENTIST], dataset, "mixed.jsonl", content)
    version = wait_validated(response.json()["id"])
    assert version.state == State.REJECTED
    codes = {(e["line"], e["code"]) for e in version.report["errors"]}
    assert codes == {(2, "not_utf8"), (3, "mixed_shape"), (4, "line_too_long")}
    assert version.valid_rows == 2


def test_roles_see_and_change_only_what_they_may(users, dataset):
    from tests.conftest import make_user

    other = make_user(Role.DATA_SCIENTIST, username="dora")
    assert client_for(other).get(f"/api/v1/datasets/{dataset.name}/").status_code == 404
    assert client_for(other).get("/api/v1/datasets/").json() == []
    response = upload(other, dataset, "x.jsonl", jsonl(CHAT_ROWS))
    assert response.status_code == 404
    assert client_for(users[Role.APP_DEVELOPER]).get("/api/v1/datasets/").status_code == 403
    cora = client_for(users[Role.COMPLIANCE_OFFICER])
    assert [d["name"] for d in cora.get("/api/v1/datasets/").json()] == ["support-chats"]
    assert upload(users[Role.COMPLIANCE_OFFICER], dataset, "x.jsonl", b"{}").status_code == 403
    ada = client_for(users[Role.ADMIN])
    assert ada.get(f"/api/v1/datasets/{dataset.name}/").status_code == 200
