"""A disk that fills during an upload: the artifact root on an 8 MiB tmpfs of its own.

A model (or dataset) larger than the free space is refused with a 507 that says why,
leaves no partial file in the store or its staging area and no version row, and the
next upload that fits is stored as usual, with nobody cleaning up in between.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from gguf import GGUFWriter

from apps.accounts.models import Role
from apps.datasets.models import DatasetVersion
from apps.datasets.services import dataset_create
from apps.registry.models import ModelVersion
from tests.conftest import client_for
from tests.registry.conftest import stored_files

DISK = "8m"


@pytest.fixture
def small_disk(artifact_root: Path) -> Path:
    """The artifact root on a tmpfs of 8 MiB, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the test machines run tests as root)")
    artifact_root.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(  # noqa: S603 - fixed arguments, our own temporary folder
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(artifact_root)],  # noqa: S607
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs at {artifact_root}: {mounted.stderr.strip()}")
    try:
        yield artifact_root
    finally:
        subprocess.run(["umount", "-l", str(artifact_root)], check=False)  # noqa: S603, S607


def write_gguf(path: Path, *, floats: int, seed: int = 0) -> Path:
    """A valid GGUF model whose one tensor holds ``floats`` float32 values."""
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name("disk-full-test")
    writer.add_context_length(256)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_file_type(0)
    rng = np.random.default_rng(seed)
    writer.add_tensor("token_embd.weight", rng.standard_normal((floats // 8, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def upload_model(client, repo: str, path: Path):
    with path.open("rb") as fh:
        return client.post(f"/api/v1/registry/repos/{repo}/versions/", {"file": fh})


def test_a_model_larger_than_the_free_space_is_refused_and_leaves_nothing(
    users, repo, small_disk, tmp_path
):
    client = client_for(users[Role.DATA_SCIENTIST])
    big = write_gguf(tmp_path / "big.gguf", floats=3 * 1024 * 1024)  # 12 MiB
    assert big.stat().st_size > os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize

    response = upload_model(client, repo.name, big)
    assert response.status_code == 507, response.content
    detail = response.json()["detail"]
    assert "not enough free disk space" in detail and "big.gguf" not in detail
    assert stored_files(small_disk) == []  # no partial file, staged or stored
    assert not ModelVersion.objects.filter(repo=repo).exists()

    # The disk is usable again at once: a model that fits is stored as usual.
    small = write_gguf(tmp_path / "small.gguf", floats=256 * 1024, seed=1)  # 1 MiB
    response = upload_model(client, repo.name, small)
    assert response.status_code == 201, response.content
    assert response.json()["number"] == 1
    assert [p.parent.name for p in stored_files(small_disk)] == [response.json()["sha256"][:2]]


def test_a_dataset_larger_than_the_free_space_is_refused_and_leaves_nothing(users, small_disk):
    dana = users[Role.DATA_SCIENTIST]
    dataset = dataset_create(actor=dana, name="too-big", licence="cc-by-4.0")
    row = {
        "messages": [
            {"role": "user", "content": "Hi " * 200},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    line = json.dumps(row).encode() + b"\n"
    big = line * (10 * 1024 * 1024 // len(line))  # 10 MiB of JSON Lines
    url = f"/api/v1/datasets/{dataset.name}/versions/"

    response = client_for(dana).post(url, {"file": SimpleUploadedFile("big.jsonl", big)})
    assert response.status_code == 507, response.content
    assert "not enough free disk space" in response.json()["detail"]
    assert stored_files(small_disk) == []
    assert not DatasetVersion.objects.filter(dataset=dataset).exists()

    response = client_for(dana).post(url, {"file": SimpleUploadedFile("small.jsonl", line * 10)})
    assert response.status_code == 201, response.content
    assert len(stored_files(small_disk)) == 1
