"""The client's timeout: a request unanswered for ``timeout`` seconds fails
with RequestTimeout (whichever path sent it), a request with its own longer
timeout is left to it, and the bookkeeping behind it stays small."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from client import Client
from protocol import ConnectionLost, RequestTimeout
from tests.helpers import broker_process, connected, running_broker

pytestmark = pytest.mark.one_loop

TIMEOUT = 0.5


async def test_requests_to_a_silent_broker_time_out_and_leave_nothing_behind(tmp_path: Path) -> None:
    with broker_process(tmp_path) as bp:
        assert bp.proc is not None
        async with Client(bp.url, timeout=TIMEOUT, reconnect=False) as c:
            await c.publish("Q", "E", b"warm")  # names checked: the next plain publish takes the fast path
            bp.proc.send_signal(signal.SIGSTOP)  # the broker reads and answers nothing
            try:
                t0 = time.monotonic()
                results = await asyncio.gather(
                    c.publish("Q", "E", b"fast path"),
                    c.publish("Q", "E", b"general path", headers={"h": "1"}),
                    c.ping(),
                    return_exceptions=True,
                )
                waited = time.monotonic() - t0
            finally:
                bp.proc.send_signal(signal.SIGCONT)
            assert all(isinstance(r, RequestTimeout) for r in results), results
            assert [str(r).split(":")[0] for r in results] == ["publish", "publish", "ping"]
            assert TIMEOUT <= waited < TIMEOUT + 2.0
            # The broker answers the three late; the client ignores that and carries on.
            await c.ping()
            assert await c.publish("Q", "E", b"after") == 3  # the two timed-out ones were stored (late)
            assert not c._pending and not c._kinds and not c._frames


async def test_a_long_poll_with_its_own_timeout_outlives_the_client_timeout(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker, timeout=0.2) as c:
        await c.publish("Q", "E", 1)
        t0 = time.monotonic()
        assert await c.fetch("Q", max_messages=10, wait=0.8, start=1) == []  # nothing there: it waits
        assert time.monotonic() - t0 >= 0.7
        assert not c._pending and not c._kinds


async def test_timeout_bookkeeping_is_per_write_not_per_publish(tmp_path: Path) -> None:
    """One entry per write, not per request: 5,000 publishes kept for a
    60 s timeout would otherwise hold 5,000 entries for a minute."""
    async with running_broker(tmp_path) as broker, connected(broker, timeout=60) as c:
        offsets = await asyncio.gather(*(c.publish("Q", "E", i) for i in range(5000)))
        assert sorted(offsets) == list(range(5000))
        assert len(c._marks) <= 50
        assert not c._pending and not c._kinds


async def test_an_idle_subscriber_finds_a_dead_broker_by_its_silence(tmp_path: Path) -> None:
    """A live broker sends an idle client something every two heartbeat
    intervals (a PING); a stopped broker (or a host gone without a FIN)
    sends nothing, and no request of the idle subscriber would time out. So
    three intervals of silence drop the connection as lost: the subscription
    ends with ConnectionLost (it waited for ever)."""
    with broker_process(tmp_path, "--heartbeat", "0.2") as bp:
        assert bp.proc is not None
        async with Client(bp.url, timeout=TIMEOUT, reconnect=False) as c:
            sub = await c.subscribe("Q", durable="d")
            with pytest.raises(asyncio.TimeoutError):
                await sub.next(timeout=1.0)  # idle but alive: PINGed and answering, not dropped
            bp.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(ConnectionLost, match=r"nothing from the broker .* \(3 heartbeat intervals"):
                    await sub.next(timeout=10)
                waited = time.monotonic() - t0
            finally:
                bp.proc.send_signal(signal.SIGCONT)
            assert waited < 5, waited  # (the silence may have begun before the stop)


async def test_a_subscriber_that_paused_reading_is_neither_silent_nor_taken_for_dead(tmp_path: Path) -> None:
    """An ephemeral subscription with more than ``max_pending`` messages
    unread pauses the client's reading: the broker's frames wait unheard in
    the socket, its PINGs unanswered. That is no silence on either side:
    the client PINGs the broker meanwhile and does not count the unread
    time against it, so eight heartbeat intervals later the same connection
    carries on, with every message published before and after. (The broker
    dropped the connection with HEARTBEAT_TIMEOUT after two intervals, the
    client its side after three; what was published after the drop never
    reached the subscription.)"""
    heartbeat = 0.2
    async with (
        running_broker(tmp_path, heartbeat=heartbeat) as broker,
        connected(broker, "pub") as pub,
        Client(f"tidings://127.0.0.1:{broker.address[1]}", name="paused", timeout=2.0, max_pending=5) as c,
    ):
        sub = await c.subscribe("Q")
        (session,) = [s for s in broker.sessions if s.name == "paused"]
        offsets = [await pub.publish("Q", "E", i.to_bytes(4, "big")) for i in range(40)]
        async with asyncio.timeout(10):
            while not c._reading_paused:  # (the state under test)
                await asyncio.sleep(0.01)
        await asyncio.sleep(8 * heartbeat)  # unread for eight intervals
        assert not session.closed, "the broker took the paused client for silent"
        offsets += [await pub.publish("Q", "E", i.to_bytes(4, "big")) for i in range(40, 50)]
        got = [(await sub.next(timeout=5)).offset for _ in offsets]
        assert got == offsets
        await c.ping()
        assert c.reconnects == 0 and not session.closed
