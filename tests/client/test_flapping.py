"""Client(reconnect=True) against connections that come back and drop at once.

A proxy in front of a real broker cuts the connection whenever a "poison"
request arrives (as a broker does that drops the connection for a request it
cannot handle), or right after every handshake (a flapping connection). The
client must neither loop forever nor reconnect in a tight loop: a request that
was pending on three dropped connections fails on its own, the backoff keeps
growing while connections flap, and only a connection that stayed up resets it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import pytest

from client import Client
from client._reconnect import BACKOFF_MAX, BACKOFF_MIN, HEALTHY_AFTER, MAX_DROPS
from protocol import ConnectionLost, Frame, Publish, Status
from tests.checker import read_all
from tests.helpers import CuttingProxy, running_broker


def _is_status(frame: Frame) -> bool:
    return isinstance(frame, Status)


def _to_poison_queue(frame: Frame) -> bool:
    return isinstance(frame, Publish) and frame.queue == "poison"


@pytest.mark.parametrize("poison", ["status", "publish"])
async def test_a_poison_request_fails_after_three_drops_and_the_others_carry_on(tmp_path: Path, poison: str) -> None:
    """Each time the poison request reaches the "broker" the connection drops.
    It fails with ConnectionLost once it was pending on MAX_DROPS dropped
    connections; a publish made in the same turn is stored (once) and
    confirmed, and the client goes on working."""
    async with (
        running_broker(tmp_path) as broker,
        CuttingProxy(broker, poison=_is_status if poison == "status" else _to_poison_queue) as proxy,
        Client(proxy.url, name="flap", reconnect_deadline=30) as c,
    ):
        await c.publish("Q", "E", "names known: the next publishes take the fast path")
        ok = asyncio.ensure_future(c.publish("Q", "E", "made with the poison"))
        bad = asyncio.ensure_future(c.status() if poison == "status" else c.publish("poison", "E", "x"))
        with pytest.raises(ConnectionLost, match=f"dropped {MAX_DROPS} times while this {poison} request"):
            await asyncio.wait_for(bad, 10)  # without the limit: resent for ever, never answered
        assert await asyncio.wait_for(ok, 10) == 1
        assert await c.publish("Q", "E", "after") == 2
        assert (proxy.cuts, len(proxy.accepted)) == (MAX_DROPS, MAX_DROPS + 1)
        assert [p for _, p in await read_all(c, "Q")] == [
            "names known: the next publishes take the fast path",
            "made with the poison",
            "after",
        ]


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_flapping_connections_back_off_and_the_client_gives_up_at_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every connection comes back and drops right after its WELCOME: the
    wait before each reconnect doubles (it does not start over at each
    successful handshake), one warning per drop, and after
    reconnect_deadline the client gives up with ConnectionLost."""
    deadline = 2.5
    async with running_broker(tmp_path) as broker, CuttingProxy(broker) as proxy:
        c = await Client.open(proxy.url, name="flap", reconnect_deadline=deadline)
        try:
            proxy.flaps = 1000
            proxy.cut_all()
            await proxy.wait_for(lambda: len(proxy.accepted) >= 8)
            # accepted[0] was the healthy connection, accepted[1] came at once;
            # then each waited twice as long as the one before.
            waits = [min(BACKOFF_MIN * 2**i, BACKOFF_MAX) for i in range(6)]
            gaps = _gaps(proxy.accepted[1:8])
            assert all(g >= w - 0.005 for g, w in zip(gaps, waits, strict=True)), (gaps, waits)
            while True:  # requests made meanwhile fail alone after MAX_DROPS drops, or with the client
                try:
                    await c.ping()
                except ConnectionLost as exc:
                    if "kept dropping" in str(exc):
                        assert f"for {deadline:g} s" in str(exc) and "closed the connection" in str(exc)
                        break
                    assert f"dropped {MAX_DROPS} times while this ping request" in str(exc)
                else:
                    raise AssertionError("a ping was answered on a connection that drops at its WELCOME")
            # 0, 0.02, 0.04 ... 0.64, 1: nine connections before the next wait passes the deadline
            assert len(proxy.accepted) <= 12, _gaps(proxy.accepted)
            drops = [r for r in caplog.records if r.name == "client._transport" and r.levelno == logging.WARNING]
            assert len(drops) <= len(proxy.accepted)
        finally:
            c.abort()


async def test_a_connection_that_stays_up_resets_the_backoff(tmp_path: Path) -> None:
    """Five connections in a row drop at their WELCOME (the waits grow to
    0.32 s); the sixth stays up for HEALTHY_AFTER; when it drops, the client
    reconnects at once again, not after 0.64 s."""
    async with (
        running_broker(tmp_path) as broker,
        CuttingProxy(broker) as proxy,
        Client(proxy.url, name="flap", reconnect_deadline=30) as c,
    ):
        proxy.flaps = 5
        proxy.cut_all()
        await proxy.wait_for(lambda: len(proxy.accepted) >= 7)
        assert proxy.accepted[6] - proxy.accepted[5] >= 0.32 - 0.005, _gaps(proxy.accepted)  # it grew
        await c.ping()  # on the sixth, which stays up
        await asyncio.sleep(HEALTHY_AFTER)  # the condition under test: up for that long
        loop = asyncio.get_running_loop()
        cut = loop.time()
        proxy.cut_all()
        await proxy.wait_for(lambda: len(proxy.accepted) >= 8)
        assert proxy.accepted[7] - cut < 0.3, "the backoff did not start over"
        assert await c.publish("Q", "E", "after") == 0
        assert len(proxy.accepted) == 8 and c.reconnects == 7
