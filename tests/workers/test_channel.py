"""The training worker's HTTP lines to the control plane (workers/finetune/channel.py and
workers/optimise/channel.py, on workers/control_plane.py), against a small real HTTP
server that answers as told: a restarting control plane is waited for, a refusal is
reported with its reason, an upload that is retried sends the whole file again, and a
progress report is tried once."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workers import control_plane
from workers.finetune.channel import ChannelError, RemoteChannel


class Plane(ThreadingHTTPServer):
    """Answers each request with the next (status, body) of ``answers``; records them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: list[tuple[int, dict]] = []
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Plane

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers), body))
        status, payload = self.server.answers.pop(0)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def plane() -> Iterator[Plane]:
    server = Plane()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    monkeypatch.setattr(control_plane, "RETRY_SECONDS", 0.05)


def test_a_restarting_control_plane_is_waited_for_and_the_upload_sent_whole_again(plane, tmp_path):
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF" + bytes(range(256)) * 4000)
    plane.answers = [(503, {}), (502, {}), (201, {"sha256": "x"})]
    line = RemoteChannel(plane.url, "aibw_secret", wait=30)

    sha256 = line.send_file(7, 2, "adapter.gguf", adapter)

    assert sha256 == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert len(plane.seen) == 3
    for method, path, headers, body in plane.seen:
        assert (method, path) == ("PUT", "/internal/v1/finetune/7/attempts/2/files/adapter.gguf")
        assert headers["Authorization"] == "Bearer aibw_secret"
        assert headers["X-Content-SHA256"] == sha256
        assert body == adapter.read_bytes()  # every try from the first byte


def test_a_refusal_is_reported_with_the_control_planes_reason(plane):
    plane.answers = [(409, {"detail": "Attempt 1 of fine-tune job 3 is no longer running."})]
    line = RemoteChannel(plane.url, "aibw_secret")
    with pytest.raises(ChannelError, match="409: Attempt 1 of fine-tune job 3 is no longer"):
        line.finish_attempt(3, 1, {"state": "failed"})
    assert len(plane.seen) == 1  # a refusal is not retried

    plane.answers = [(401, {"detail": "The worker credential 'gpu-2' was revoked."})]
    with pytest.raises(ChannelError, match="refused this worker's credential.*revoked"):
        line.status(3)


def test_a_claim_that_lost_is_none_and_a_won_one_is_the_order(plane):
    order = {
        "job_id": 5,
        "attempt": 1,
        "base_sha256": "a" * 64,
        "base_label": "gemma v1",
        "train": {"sha256": "b" * 64, "format": "jsonl", "label": "secrets v1"},
        "shape": "chat",
        "params": {"max_steps": 2},
    }
    plane.answers = [(409, {"detail": "not waiting"}), (200, {"order": order})]
    line = RemoteChannel(plane.url, "aibw_secret")
    assert line.claim(5, "w@host") is None
    won = line.claim(5, "w@host")
    assert won.train.sha256 == "b" * 64 and won.validation is None
    assert json.loads(plane.seen[1][3]) == {"worker": "w@host"}


def test_an_unreachable_control_plane_fails_after_the_wait_naming_it():
    line = RemoteChannel("http://127.0.0.1:9", "aibw_secret", wait=0.3)
    with pytest.raises(ChannelError, match=r"could not reach the control plane at http://127"):
        line.status(1)
    assert "aibw_secret" not in repr(line)


def test_send_outcome_uploads_both_adapters_before_it_reports(plane, tmp_path):
    from workers.finetune.order import TrainingOrder
    from workers.finetune.spec import TrainResult

    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_model.safetensors").write_bytes(b"weights")
    (peft / "adapter_config.json").write_text(json.dumps({"r": 4}))
    gguf = tmp_path / "adapter.gguf"
    gguf.write_bytes(b"GGUF adapter")
    result = TrainResult(
        state="succeeded", peft_dir=peft, gguf_path=gguf, steps=2, max_steps=2,
        epochs_done=1.0, final_train_loss=1.0, final_validation_loss=None, duration_s=1.0,
        tokens_per_s=1.0,
    )  # fmt: skip
    order = TrainingOrder.from_dict(
        {
            "job_id": 9,
            "attempt": 3,
            "base_sha256": "a" * 64,
            "base_label": "gemma",
            "train": {"sha256": "b" * 64, "format": "jsonl", "label": "d v1"},
            "shape": "chat",
            "params": {},
        }
    )
    plane.answers = [(201, {}), (201, {}), (200, {"state": "succeeded", "reason": ""})]
    state = RemoteChannel(plane.url, "aibw_secret").send_outcome(order, "succeeded", "", result)

    assert state == "succeeded"
    paths = [path for _, path, _, _ in plane.seen]
    assert paths == [
        "/internal/v1/finetune/9/attempts/3/files/adapter.gguf",
        "/internal/v1/finetune/9/attempts/3/files/adapter_model.safetensors",
        "/internal/v1/finetune/9/attempts/3/finish",
    ]
    outcome = json.loads(plane.seen[2][3])
    assert outcome["files"] == {
        "adapter.gguf": hashlib.sha256(b"GGUF adapter").hexdigest(),
        "adapter_model.safetensors": hashlib.sha256(b"weights").hexdigest(),
    }
    assert outcome["peft_config"] == {"r": 4} and outcome["result"]["steps"] == 2


def test_an_optimise_report_is_tried_once_and_never_stops_the_work(plane, caplog):
    from workers.optimise.channel import RemoteChannel as OptimiseChannel

    plane.answers = [(503, {}), (409, {"detail": "The optimise job 4 is not running on w."})]
    line = OptimiseChannel(plane.url, "aibw_secret", wait=30)
    line.report("jobs", 4, "w@host", 40, "Quantising")  # a restart: not waited for
    line.report("jobs", 4, "w@host")  # reaped meanwhile: logged, the job's end says so
    assert len(plane.seen) == 2
    assert json.loads(plane.seen[0][3]) == {
        "worker": "w@host",
        "percent": 40,
        "message": "Quantising",
    }
    assert json.loads(plane.seen[1][3]) == {"worker": "w@host"}  # only the heartbeat
    assert "not running on w" in caplog.text


def test_an_optimise_claim_is_the_order_of_its_kind(plane):
    from workers.optimise.channel import RemoteChannel as OptimiseChannel
    from workers.optimise.order import EvaluationOrder

    order = {
        "job_id": 9,
        "model_sha256": "a" * 64,
        "model_label": "gemma v2",
        "architecture": "gemma3",
        "dataset": {"sha256": "b" * 64, "format": "jsonl", "label": "prose v1"},
        "shape": "text",
        "params": {"metric": "perplexity"},
        "reference_sha256": "c" * 64,
    }
    plane.answers = [(200, {"order": order})]
    won = OptimiseChannel(plane.url, "aibw_secret").claim("evaluations", 9, "w@host")
    assert isinstance(won, EvaluationOrder)
    assert won.inputs == {"a" * 64, "b" * 64, "c" * 64}
    assert plane.seen[0][1] == "/internal/v1/optimise/evaluations/9/claim"
