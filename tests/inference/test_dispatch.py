"""A client that leaves while its request is being routed and sent to a worker: the
request is still cancelled and its admission released once the sending is done."""

from __future__ import annotations

import asyncio
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

from apps.inference import exchange


class _Sent:
    """What ``exchange_open`` returns once the request is on the worker's queue."""

    def __init__(self) -> None:
        self.finished_with: list[bool] = []

    def finish_soon(self, *, cancelled: bool = False):
        self.finished_with.append(cancelled)


def test_leaving_during_dispatch_cancels_the_sent_request(monkeypatch):
    sent = _Sent()
    sending = threading.Event()
    may_finish = threading.Event()

    def slow_open(authorize, kind, body):
        sending.set()
        may_finish.wait(10)
        return sent

    # The stand-in takes what exchange_open takes: a change to it breaks this test, not hides.
    parameters = list(inspect.signature(exchange.exchange_open).parameters)
    assert list(inspect.signature(slow_open).parameters) == parameters
    monkeypatch.setattr(exchange, "exchange_open", slow_open)

    async def scenario() -> None:
        view = asyncio.ensure_future(exchange.dispatch(lambda: None, "chat", b"{}"))
        while not sending.is_set():
            await asyncio.sleep(0.01)
        view.cancel()  # what Django does when the client disconnects
        await asyncio.gather(view, return_exceptions=True)
        assert view.cancelled()
        assert sent.finished_with == []  # still being sent: nothing to cancel yet
        may_finish.set()
        for _ in range(500):
            if sent.finished_with:
                break
            await asyncio.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result()
    assert sent.finished_with == [True]
