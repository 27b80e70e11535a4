"""Client.aclose(): BYE, the answers to everything sent before it, then the
close; bounded by its timeout, and by the caller's cancellation."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from client import Client, ConnectionClosed
from tests.helpers import broker_process, connected, running_broker, url_of


async def test_aclose_waits_for_the_answers_to_what_was_sent(tmp_path: Path) -> None:
    """Publishes not awaited yet when aclose() is called still get their
    offsets, a DELETE its OK, and a FETCH that would wait 30 s its empty
    answer at once: the broker answers everything sent before the BYE
    (SPEC 3, item 4). (They all failed with ConnectionClosed, the records
    stored all the same: the broker closed at once on BYE.)"""
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as c:
            await c.publish("old", "E")
        c = await Client.open(url_of(broker))
        # Tasks run in the order they were made: every request is written before aclose() runs.
        publishes = [asyncio.ensure_future(c.publish("Q", "E", i)) for i in range(5)]
        deleted = asyncio.ensure_future(c.delete_queue("old"))
        fetched = asyncio.ensure_future(c.fetch("W", durable="w", wait=30))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.ensure_future(c.aclose())
        assert loop.time() - started < 5
        assert [p.result() for p in publishes] == [0, 1, 2, 3, 4]
        assert deleted.result() is None
        assert fetched.result() == []
        with pytest.raises(ConnectionClosed):
            await c.publish("Q", "E", "after aclose")
        async with connected(broker) as other:
            assert [m.payload for m in await other.fetch("Q")] == [0, 1, 2, 3, 4]


@pytest.mark.one_loop
async def test_a_cancelled_aclose_aborts_and_the_cancellation_goes_on(tmp_path: Path) -> None:
    """The caller's deadline cancels aclose() while it waits for a broker
    that does not answer (stopped: SIGSTOP): the connection is aborted and
    the cancellation propagates, so the caller's asyncio.timeout raises
    TimeoutError. (aclose() swallowed the cancellation and returned as if it
    had closed gracefully: the caller's timeout never fired.)"""
    with broker_process(tmp_path) as bp:
        assert bp.proc is not None
        c = await Client.open(bp.url, reconnect=False)
        bp.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await c.aclose(timeout=30)
        finally:
            bp.proc.send_signal(signal.SIGCONT)
        with pytest.raises(ConnectionClosed):
            await c.publish("Q", "E")
