"""A connection's lifecycle on the broker (SPEC section 3): heartbeats, BYE,
the connection limit. Real sockets; a RawPeer where the test needs frames a
real client would not send, or needs to see exactly what the broker sends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from client import Client, TooManyConnections
from protocol import Err, ErrorCode, Ping, Pong
from tests.helpers import RawPeer, assert_broker_healthy, broker_process, connected, running_broker, url_of


async def test_any_frame_is_a_sign_of_life_and_two_silent_intervals_end_the_connection(tmp_path: Path) -> None:
    """SPEC 3.3. The broker PINGs a silent peer; the peer answers with a
    PING of its own, not a PONG, then says nothing more. That PING ended the
    silence: the broker PINGs again after the next silent interval, and
    drops the peer only after the second silent interval in a row. (Only a
    PONG used to count: HEARTBEAT_TIMEOUT came one interval after the peer's
    PING, with no second PING.)"""
    heartbeat = 0.5  # (the peer answers the PING within it: a loaded machine has half a second)
    async with running_broker(tmp_path, heartbeat=heartbeat) as broker:
        peer = await RawPeer.connect(broker)
        assert await asyncio.wait_for(peer.recv(pings=True), 5) == Ping(0)
        peer.send_frame(Ping(5))
        loop = asyncio.get_running_loop()
        sent = loop.time()
        frames = []
        try:
            while True:
                frames.append(await asyncio.wait_for(peer.recv(pings=True), 5))
        except ConnectionError:
            pass
        took = loop.time() - sent
        assert frames[:2] == [Pong(5), Ping(0)], frames
        assert len(frames) == 3 and isinstance(frames[2], Err), frames
        assert frames[2].code == ErrorCode.HEARTBEAT_TIMEOUT and frames[2].req == 0
        # The check after the peer's PING found it heard; the next two found silence.
        assert took >= 2 * heartbeat, took
        peer.close()
        await assert_broker_healthy(broker)


async def test_a_broker_at_its_connection_limit_says_so_at_once(tmp_path: Path) -> None:
    """SPEC 3, item 2: ERR req=0 TOO_MANY_CONNECTIONS as soon as the broker
    accepts, before any HELLO, then the close. The client reports it as
    TooManyConnections, whichever came first, its HELLO or the ERR (on
    uvloop the ERR reached the client before create_connection returned: it
    then sent HELLO on the closed socket and reported RequestTimeout once
    its timeout ran out)."""
    async with running_broker(tmp_path, max_connections=1) as broker, connected(broker, "first") as first:
        peer = await RawPeer.connect(broker, hello=False)
        reply = await asyncio.wait_for(peer.recv(), 5)  # having sent nothing
        assert isinstance(reply, Err) and (reply.req, reply.code) == (0, ErrorCode.TOO_MANY_CONNECTIONS), reply
        await peer.expect_closed()
        for reconnect in (False, True):
            with pytest.raises(TooManyConnections) as info:
                await Client.open(url_of(broker), timeout=3, reconnect=reconnect)
            assert info.value.code is ErrorCode.TOO_MANY_CONNECTIONS and info.value.retriable
        await first.ping()  # the connection within the limit is untouched
    assert broker.sessions == set()


def test_the_daemon_with_max_connections_1_refuses_the_second_client(tmp_path: Path) -> None:
    """``tidings-broker --max-connections 1``: a second Python client gets
    TooManyConnections, on either event loop; the first carries on."""

    async def second(url: str) -> None:
        async with Client(url, name="first") as first:
            with pytest.raises(TooManyConnections):
                await Client.open(url, name="second", timeout=3)
            await first.ping()

    import uvloop

    with broker_process(tmp_path, "--max-connections", "1") as bp:
        asyncio.run(second(bp.url))
        uvloop.run(second(bp.url))
