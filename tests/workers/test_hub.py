"""workers/hub.py with the real huggingface_hub client against tests/hubserver.py."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import time

import pytest

from workers.hub import (
    DownloadTooLarge,
    HubError,
    check_filename,
    check_repo_id,
    check_revision,
    hub_download,
    hub_file_info,
)

TOKEN = "hf_TestTokenThatMustNeverLeak0123456789"


def info(hub, repo_id, filename, **kwargs):
    kwargs.setdefault("token", None)
    return hub_file_info(repo_id=repo_id, filename=filename, endpoint=hub.url, **kwargs)


def test_resolves_a_branch_to_its_commit_and_downloads_that_commit(fake_hub, tmp_path):
    first = fake_hub.add_file("acme/tiny", "gguf/tiny.gguf", b"GGUF first", licence="mit")
    f = info(fake_hub, "acme/tiny", "gguf/tiny.gguf")
    assert f.commit == first and f.revision == "main" and f.name == "tiny.gguf"
    assert f.sha256 == f.etag == hashlib.sha256(b"GGUF first").hexdigest()
    assert f.size == len(b"GGUF first") and f.licence == "mit" and not f.gated

    # The branch moves on after the file was described: the download still gets the
    # bytes of the recorded commit.
    fake_hub.add_file("acme/tiny", "gguf/tiny.gguf", b"GGUF second, different")
    path = hub_download(file=f, dest_dir=tmp_path / "dl", token=None)
    assert path.read_bytes() == b"GGUF first"
    assert path.is_relative_to(tmp_path / "dl")
    # An LFS file comes from the CDN host, and no credentials go there.
    cdn = [r for r in fake_hub.requests if r.path.startswith("/_cdn/")]
    assert cdn and all(r.host.startswith("localhost:") for r in cdn)


def test_a_commit_or_tag_can_be_asked_for(fake_hub):
    commit = fake_hub.add_file("acme/tiny", "a.gguf", b"GGUF a", revision="v1")
    assert info(fake_hub, "acme/tiny", "a.gguf", revision="v1").commit == commit
    assert info(fake_hub, "acme/tiny", "a.gguf", revision=commit).commit == commit


def test_files_kept_in_git_have_an_etag_but_no_sha256(fake_hub, tmp_path):
    fake_hub.add_file("acme/small", "README.md", b"# hi", lfs=False)
    f = info(fake_hub, "acme/small", "README.md")
    assert f.sha256 is None and len(f.etag) == 40
    f.check_sha256("anything")  # nothing announced, nothing to compare
    assert hub_download(file=f, dest_dir=tmp_path, token=None).read_bytes() == b"# hi"


def test_dataset_repos(fake_hub, tmp_path):
    fake_hub.add_file(
        "acme/chats", "data/train.jsonl", b'{"a": 1}\n', repo_type="dataset", licence="cc-by-4.0"
    )
    f = info(fake_hub, "acme/chats", "data/train.jsonl", repo_type="dataset")
    assert f.repo_type == "dataset" and f.licence == "cc-by-4.0"
    assert hub_download(file=f, dest_dir=tmp_path, token=None).read_bytes() == b'{"a": 1}\n'
    with pytest.raises(HubError, match="No repository acme/chats"):
        info(fake_hub, "acme/chats", "data/train.jsonl")  # not a model repo


def test_licence_falls_back_to_tags_and_may_be_absent(fake_hub):
    fake_hub.add_file("acme/nolicence", "a.gguf", b"GGUF", licence=None)
    assert info(fake_hub, "acme/nolicence", "a.gguf").licence == ""


@pytest.mark.parametrize(
    ("repo_id", "filename", "revision", "message"),
    [
        ("acme/missing", "a.gguf", "main", "No repository acme/missing@main on http://"),
        ("acme/tiny", "b.gguf", "main", "acme/tiny has no file 'b.gguf' at main"),
        ("acme/tiny", "a.gguf", "no-such-branch", "no such branch, tag or commit"),
    ],
)
def test_missing_things_are_named(fake_hub, repo_id, filename, revision, message):
    fake_hub.add_file("acme/tiny", "a.gguf", b"GGUF")
    with pytest.raises(HubError, match=message):
        info(fake_hub, repo_id, filename, revision=revision)


def test_gated_repo_needs_the_right_token(fake_hub, tmp_path):
    fake_hub.add_file("acme/gated", "g.gguf", b"GGUF gated", gated_token=TOKEN)
    with pytest.raises(HubError, match="is gated.*AIBOX_HF_TOKEN") as no_token:
        info(fake_hub, "acme/gated", "g.gguf")
    with pytest.raises(HubError, match="refused the configured Hugging Face token") as wrong:
        info(fake_hub, "acme/gated", "g.gguf", token="hf_wrong")

    f = info(fake_hub, "acme/gated", "g.gguf", token=TOKEN)
    assert f.gated
    assert hub_download(file=f, dest_dir=tmp_path, token=TOKEN).read_bytes() == b"GGUF gated"
    # Sent to the hub, never to the CDN; and nowhere in what the caller keeps or shows.
    sent = {(r.host.split(":")[0], r.authorization) for r in fake_hub.requests}
    assert ("127.0.0.1", f"Bearer {TOKEN}") in sent
    assert all(auth is None for host, auth in sent if host == "localhost")
    for text in (str(no_token.value), str(wrong.value), repr(f), str(f.as_dict())):
        assert TOKEN not in text


def test_a_stored_machine_token_is_never_sent(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    fake_hub.add_file("acme/tiny", "a.gguf", b"GGUF")
    info(fake_hub, "acme/tiny", "a.gguf")
    assert all(r.authorization is None for r in fake_hub.requests)


def test_an_unreachable_hub_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match=f"Could not reach the hub at http://127.0.0.1:{port}"):
        hub_file_info(
            repo_id="acme/tiny", filename="a.gguf", endpoint=f"http://127.0.0.1:{port}", token=None
        )


def test_a_lying_hub_is_caught_by_the_sha256(fake_hub, tmp_path):
    fake_hub.add_file("acme/liar", "a.gguf", b"GGUF real bytes", announced_sha256="0" * 64)
    f = info(fake_hub, "acme/liar", "a.gguf")
    path = hub_download(file=f, dest_dir=tmp_path, token=None)
    with pytest.raises(HubError, match="but the hub announced 0000"):
        f.check_sha256(hashlib.sha256(path.read_bytes()).hexdigest())


def test_progress_is_reported_while_bytes_arrive_and_not_too_often(fake_hub, tmp_path):
    # huggingface_hub writes in 10 MiB pieces: 25 MiB, served slowly, shows them arrive.
    data = bytes(range(256)) * (25 * 4096)
    fake_hub.add_file("acme/big", "big.gguf", data)
    fake_hub.chunk_size, fake_hub.seconds_per_chunk = 1024 * 1024, 0.06
    f = info(fake_hub, "acme/big", "big.gguf")
    calls: list[tuple[float, int, int]] = []
    path = hub_download(
        file=f,
        dest_dir=tmp_path,
        token=None,
        progress=lambda done, total: calls.append((time.monotonic(), done, total)),
        interval=0.25,
    )
    assert path.stat().st_size == len(data)
    done = [c[1] for c in calls]
    assert done == sorted(done) and done[-1] == len(data)
    assert all(c[2] == len(data) for c in calls)
    assert any(0 < d < len(data) for d in done), calls
    # At most one report per interval while downloading (the last one ends it).
    gaps = [b[0] - a[0] for a, b in zip(calls[:-1], calls[1:-1], strict=False)]
    assert all(gap >= 0.2 for gap in gaps), gaps


@pytest.mark.parametrize("bad", ["acme", "acme/../x", "/etc/passwd", "a/b/c", "acme/x y", ""])
def test_repo_ids_are_checked(bad):
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        check_repo_id(bad)


@pytest.mark.parametrize("bad", ["../x.gguf", "a/../../x.gguf", "/x.gguf", "a//b", "a\\b", ""])
def test_file_names_are_checked(bad):
    with pytest.raises(HubError, match="not a file name in a repo"):
        check_filename(bad)


def test_good_names_pass():
    assert check_repo_id(" google/gemma-3-270m ") == "google/gemma-3-270m"
    assert check_filename("gguf/q4_k_m/model.gguf") == "gguf/q4_k_m/model.gguf"
    assert check_revision("") == "main" and check_revision("refs/pr/1") == "refs/pr/1"
    with pytest.raises(HubError):
        check_revision("../main")


@pytest.mark.parametrize("stated", [None, 1024], ids=["size not stated", "size understated"])
def test_the_size_limit_holds_while_bytes_arrive(fake_hub, tmp_path, stated):
    """A hub that states no size, or too small a one, cannot fill the disk past the limit."""
    data = bytes(range(256)) * (25 * 4096)  # 25 MiB
    fake_hub.add_file("acme/huge", "huge.gguf", data)
    fake_hub.chunk_size, fake_hub.seconds_per_chunk = 1024 * 1024, 0.02
    f = dataclasses.replace(info(fake_hub, "acme/huge", "huge.gguf"), size=stated)
    with pytest.raises(DownloadTooLarge, match="larger than the limit of 5,000,000 bytes"):
        hub_download(file=f, dest_dir=tmp_path / "dl", token=None, max_bytes=5_000_000)
    written = sum(p.stat().st_size for p in (tmp_path / "dl").rglob("*") if p.is_file())
    assert written < len(data)
