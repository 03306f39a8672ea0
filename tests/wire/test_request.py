"""Request/reply (``wire/request.py``): the asker's pending table and the answerer's replies, over a real channel."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from cluster_server._errors import BindError, DisconnectedError, RequestError
from cluster_server.wire import channel as channel_module
from cluster_server.wire.channel import Channel, Message
from cluster_server.wire.messages import RES
from cluster_server.wire.request import Answer, Pending, Replier

from ..conftest import is_open


def received(ch: Channel) -> list[tuple[Message, list[int]]]:
    out: list[tuple[Message, list[int]]] = []
    for msg, fds in ch.receive():
        assert isinstance(msg, dict), msg
        out.append((msg, fds))
    return out


def test_an_answer_settles_its_request_with_data_and_fds() -> None:
    pending: Pending[concurrent.futures.Future[Answer]] = Pending()
    first: concurrent.futures.Future[Answer] = concurrent.futures.Future()
    second: concurrent.futures.Future[Answer] = concurrent.futures.Future()
    r1, r2 = pending.add(first), pending.add(second)
    assert r1 is not None and r2 is not None and r1 != r2
    r, w = os.pipe()
    try:
        assert pending.resolve({"t": RES, "id": r2, "data": [1, 2]}, [r])
        assert second.result(0) == ([1, 2], [r]) and not first.done()
        assert len(pending) == 1
    finally:
        os.close(r)
        os.close(w)


def test_errors_become_request_or_bind_errors() -> None:
    pending: Pending[concurrent.futures.Future[Answer]] = Pending()
    asked: concurrent.futures.Future[Answer] = concurrent.futures.Future()
    listened: concurrent.futures.Future[Answer] = concurrent.futures.Future()
    rid, lid = pending.add(asked), pending.add(listened)
    assert pending.resolve({"t": RES, "id": rid, "error": "no handler"}, [])
    assert pending.resolve({"t": RES, "id": lid, "error": "port in use", "kind": "bind"}, [])
    with pytest.raises(RequestError, match="no handler"):
        asked.result(0)
    with pytest.raises(BindError, match="port in use"):
        listened.result(0)


def test_late_or_stray_answers_close_their_fds() -> None:
    pending: Pending[concurrent.futures.Future[Answer]] = Pending()
    fut: concurrent.futures.Future[Answer] = concurrent.futures.Future()
    rid = pending.add(fut)
    assert rid is not None
    pending.discard(rid)  # timed out
    r, w = os.pipe()
    os.close(w)
    assert not pending.resolve({"t": RES, "id": rid, "data": 1}, [r])
    assert not is_open(r)
    assert not pending.resolve({"t": RES, "id": "x", "data": 1}, [])
    fut2: concurrent.futures.Future[Answer] = concurrent.futures.Future()
    rid2 = pending.add(fut2)
    fut2.cancel()  # its waiter gave up
    r, w = os.pipe()
    os.close(w)
    assert not pending.resolve({"t": RES, "id": rid2, "data": 1}, [r])
    assert not is_open(r)


def test_close_fails_every_waiting_request_and_refuses_new_ones() -> None:
    pending: Pending[concurrent.futures.Future[Answer]] = Pending()
    futs: list[concurrent.futures.Future[Answer]] = [concurrent.futures.Future() for _ in range(3)]
    for f in futs:
        pending.add(f)
    pending.close(lambda: DisconnectedError("gone"))
    for f in futs:
        with pytest.raises(DisconnectedError, match="gone"):
            f.result(0)
    assert pending.add(concurrent.futures.Future()) is None


def test_asyncio_futures_work_the_same() -> None:
    async def main() -> Any:
        pending: Pending[asyncio.Future[Answer]] = Pending()
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        rid = pending.add(fut)
        assert rid is not None
        pending.resolve({"t": RES, "id": rid, "data": "ok"}, [])
        gave_up: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        late = pending.add(gave_up)
        gave_up.cancel()  # wait_for timed out; the answer comes before it is discarded
        assert not pending.resolve({"t": RES, "id": late, "data": "late"}, [])
        failed: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        pending.add(failed)
        failed.cancel()
        pending.close(lambda: DisconnectedError("gone"))  # a cancelled one is skipped, not an error
        return await fut

    assert asyncio.run(main()) == ("ok", [])


def channel_send(ch: Channel) -> Any:
    def send(msg: Message, fds: Sequence[int]) -> bool:
        return ch.send(msg, fds)

    return send


def test_replier_answers_once_whatever_the_handler_does(
    ends: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = ends
    monkeypatch.setattr(channel_module, "MAX_LARGE_MESSAGE", 64 * 1024)  # (256 MiB: too big to build here)
    replier = Replier(channel_send(a), "worker 3")
    replier.call(1, lambda data: data * 2, 21)
    replier.call(2, lambda data: {"yes": 1}[data], "nope")
    replier.call(3, lambda data: object(), None)  # not JSON
    replier.call(4, lambda data: "x" * 70_000, None)  # over the limit
    got = {msg["id"]: msg for msg, _ in received(b)}
    assert got[1] == {"t": RES, "id": 1, "data": 42}
    assert got[2] == {"t": RES, "id": 2, "error": "worker 3's request handler raised KeyError: 'nope'"}
    assert got[3]["error"].startswith("worker 3's answer cannot be sent: ") and "data" not in got[3]
    assert got[4]["error"].startswith("worker 3's answer cannot be sent: ")


def test_replier_hands_over_fds_and_extra_fields(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    replier = Replier(channel_send(a), "the primary")
    r, w = os.pipe()
    try:
        replier.answer(7, ["127.0.0.1", 8000], [os.dup(r)])
        replier.refuse(8, "cannot bind", kind="bind")
        (m7, fds7), (m8, fds8) = received(b)
        assert m7 == {"t": RES, "id": 7, "data": ["127.0.0.1", 8000]} and len(fds7) == 1
        os.write(w, b"!")
        assert os.read(fds7[0], 1) == b"!"  # the same pipe, handed over
        os.close(fds7[0])
        assert m8 == {"t": RES, "id": 8, "kind": "bind", "error": "cannot bind"} and fds8 == []
    finally:
        os.close(r)
        os.close(w)


def test_replier_answers_async_handlers_when_they_finish(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    replier = Replier(channel_send(a), "the primary")

    async def double(data: int) -> int:
        await asyncio.sleep(0)
        return data * 2

    async def fail(data: Any) -> None:
        raise ValueError("bad op")

    async def main() -> None:
        replier.call(1, double, 5, asyncio.ensure_future)
        replier.call(2, fail, None, asyncio.ensure_future)
        task = asyncio.ensure_future(asyncio.sleep(10))
        task.add_done_callback(lambda f: replier.settle(3, f))
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(main())
    got = {msg["id"]: msg for msg, _ in received(b)}
    assert got[1] == {"t": RES, "id": 1, "data": 10}
    assert got[2]["error"] == "the primary's request handler raised ValueError: bad op"
    assert got[3]["error"] == "the primary's request handler was cancelled"


def test_replier_on_a_closed_loop_answers_with_an_error(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    replier = Replier(channel_send(a), "worker 1")
    loop = asyncio.new_event_loop()
    loop.close()

    async def handler(data: Any) -> int:
        return 1

    replier.call(9, handler, None, lambda aw: asyncio.run_coroutine_threadsafe(aw, loop))  # type: ignore[arg-type]
    [(msg, _)] = received(b)
    assert msg["id"] == 9 and msg["error"].startswith("worker 1: ")


def test_replier_ignores_a_peer_that_is_gone() -> None:
    def gone(msg: Message, fds: Sequence[int]) -> bool:
        raise DisconnectedError("the channel is closed")

    Replier(gone, "worker 1").call(1, lambda d: d, 1)  # nothing raised: nobody to answer


def test_pending_is_thread_safe() -> None:
    """Threads ask while another answers (as a worker's channel thread does): every request
    gets a distinct id and is settled exactly once."""
    pending: Pending[concurrent.futures.Future[Answer]] = Pending()
    asked: queue.Queue[tuple[int, concurrent.futures.Future[Answer]] | None] = queue.Queue()
    settled: list[tuple[int, concurrent.futures.Future[Answer]]] = []

    def ask() -> None:
        for _ in range(200):
            fut: concurrent.futures.Future[Answer] = concurrent.futures.Future()
            rid = pending.add(fut)
            if rid is not None:
                asked.put((rid, fut))

    def answer() -> None:
        while (item := asked.get(timeout=10)) is not None:
            if pending.resolve({"t": RES, "id": item[0], "data": item[0]}, []):
                settled.append(item)

    answerer = threading.Thread(target=answer)
    answerer.start()
    askers = [threading.Thread(target=ask) for _ in range(4)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(10)
    asked.put(None)
    answerer.join(10)
    assert len({rid for rid, _ in settled}) == len(settled) == 800
    assert all(f.result(0) == (rid, []) for rid, f in settled)
    assert len(pending) == 0
