"""A connection's lifecycle on the broker (SPEC section 3): heartbeats, BYE,
the connection limit. Real sockets; a RawPeer where the test needs frames a
real client would not send, or needs to see exactly what the broker sends."""

from __future__ import annotations

import asyncio
from pathlib import Path

from protocol import Err, ErrorCode, Ping, Pong
from tests.helpers import RawPeer, assert_broker_healthy, running_broker


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
