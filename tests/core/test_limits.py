import asyncio
from concurrent.futures import ThreadPoolExecutor

from aibox.limits import BodySizeLimit


def run(headers, chunks):
    sent, seen = [], []
    queue = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return queue.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": headers}

    async def inner(scope, receive, send):
        while True:
            message = await receive()
            seen.append(len(message["body"]))
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    # In its own thread: the browser tests keep an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, BodySizeLimit(inner)(scope, receive, send)).result()
    return sent, seen


def test_declared_length_over_the_limit_is_refused_before_reading(settings):
    settings.UPLOAD_MAX_BYTES = 10
    sent, seen = run([(b"content-length", str(5 * 1024 * 1024).encode())], [b"x"])
    assert sent[0]["status"] == 413 and seen == []
    assert b"upload limit (10 bytes)" in sent[1]["body"]


def test_streamed_body_over_the_limit_is_cut_off(settings):
    settings.UPLOAD_MAX_BYTES = 10
    chunk = b"x" * (512 * 1024)
    sent, seen = run([], [chunk, chunk, chunk, chunk, chunk])
    assert sent[0]["status"] == 413
    assert len(seen) < 5  # it stopped reading


def test_bodies_within_the_limit_pass(settings):
    settings.UPLOAD_MAX_BYTES = 10
    sent, seen = run([(b"content-length", b"3")], [b"abc"])
    assert sent[0]["status"] == 200 and seen == [3]
