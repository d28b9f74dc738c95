"""Uploads whose connection drops: a TCP proxy in front of the box cuts connections
part-way through the body. The box has no resumable uploads, so the client starts again
from the first byte, a bounded number of times, and says what happened when it gives up."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from aibox_client import AIBox, UploadInterrupted
from aibox_client.cli import EXIT_CONNECTION

from apps.accounts.models import Role
from tests.client.conftest import TRAIN_ROWS, run_aibox

pytestmark = pytest.mark.django_db


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the box; the first ``cuts`` connections are closed
    after ``after`` bytes of the request have gone through."""

    def __init__(self, target: str, *, cuts: int, after: int) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.cuts, self.after = cuts, after
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            cut = self.connections <= self.cuts
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()
        self._pipe(client, upstream, self.after if cut else None)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                if limit is not None and passed + len(data) > limit:
                    # The connection dies part-way: both ends are reset, as a network would.
                    for end in (source, sink):
                        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                        end.close()
                    return
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(box) -> Iterator:
    opened = []

    def make(*, cuts: int, after: int = 40_000) -> CuttingProxy:
        proxy = CuttingProxy(box.url, cuts=cuts, after=after)
        opened.append(proxy)
        return proxy

    yield make
    for proxy in opened:
        proxy.close()


@pytest.fixture
def big_dataset(tmp_path):
    """About 300 KB of valid chat rows: a body that takes several reads to send."""
    path = tmp_path / "big.jsonl"
    rows = [TRAIN_ROWS[i % len(TRAIN_ROWS)] for i in range(2000)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_dropped_upload_is_sent_again_and_stored_once(box, proxy, big_dataset):
    admin = AIBox(box.url, box.keys[Role.ADMIN], progress=False)
    admin.create_dataset("client-dropped", licence="cc0-1.0")
    cutting = proxy(cuts=1)
    through = AIBox(cutting.url, box.keys[Role.ADMIN], progress=False, upload_retries=2)

    version = through.upload_dataset_version("client-dropped", big_dataset, wait=True)

    assert cutting.connections >= 2  # the first was cut, a second one carried it
    assert version["state"] == "valid" and version["rows"] == 2000
    assert [v["id"] for v in admin.dataset("client-dropped")["versions"]] == [version["id"]]


def test_an_upload_that_keeps_dropping_is_reported(box, proxy, big_dataset):
    admin = AIBox(box.url, box.keys[Role.ADMIN], progress=False)
    admin.create_dataset("client-cut", licence="cc0-1.0")
    cutting = proxy(cuts=100)
    through = AIBox(cutting.url, box.keys[Role.ADMIN], progress=False, upload_retries=1)

    with pytest.raises(UploadInterrupted) as dropped:
        through.upload_dataset_version("client-cut", big_dataset)
    error = dropped.value
    assert error.attempts == 2 and error.total == big_dataset.stat().st_size
    assert "failed 2 time(s)" in error.message and "Nothing was stored" in error.message
    assert admin.dataset("client-cut")["versions"] == []

    result = run_aibox(
        box,
        Role.ADMIN,
        "datasets",
        "upload",
        "client-cut",
        str(big_dataset),
        AIBOX_URL=cutting.url,
    )
    assert result.returncode == EXIT_CONNECTION == 5
    assert "the connection dropped after" in result.stderr
