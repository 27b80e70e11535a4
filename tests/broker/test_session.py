"""A connection's lifecycle on the broker (SPEC section 3): heartbeats, BYE,
the connection limit. Real sockets; a RawPeer where the test needs frames a
real client would not send, or needs to see exactly what the broker sends."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from client import Client, TooManyConnections
from protocol import (
    PROTOCOL_VERSION,
    AuthFailed,
    Batch,
    Bye,
    Delete,
    Deliver,
    Err,
    ErrorCode,
    Fetch,
    Hello,
    Ok,
    Ping,
    Pong,
    PubAck,
    Publish,
    Subscribe,
    encode_frame,
)
from tests.helpers import RawPeer, assert_broker_healthy, broker_process, connected, running_broker, url_of


async def until_closed(peer: RawPeer, *, pings: bool = False) -> list[Any]:
    """Every frame the broker sends until it closes the connection."""
    frames = []
    try:
        while True:
            frames.append(await asyncio.wait_for(peer.recv(pings=pings), 10))
    except ConnectionError:
        pass
    peer.close()
    return frames


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
        frames = await until_closed(peer, pings=True)
        took = loop.time() - sent
        assert frames[:2] == [Pong(5), Ping(0)], frames
        assert len(frames) == 3 and isinstance(frames[2], Err), frames
        assert frames[2].code == ErrorCode.HEARTBEAT_TIMEOUT and frames[2].req == 0
        # The check after the peer's PING found it heard; the next two found silence.
        assert took >= 2 * heartbeat, took
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


@pytest.mark.parametrize("half_close", [False, True], ids=["open", "half-closed"])
async def test_bye_answers_every_request_sent_before_it_then_closes(tmp_path: Path, half_close: bool) -> None:
    """SPEC 3, item 4. In one write: two PUBLISHes (PUBACKs after their
    fsync), a DELETE (its OK from a worker thread), a FETCH that would wait
    30 s (answered at once, empty: the peer is leaving), a PING, then BYE,
    and frames after it that are not read. Each request gets its answer,
    then the broker closes. With ``half_close`` the peer also shuts its
    sending side after the BYE. (The broker closed at once: the PUBACKs and
    the OK were lost although the records were stored.)"""
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as c:
            await c.publish("old", "E")
        peer = await RawPeer.connect(broker)
        requests = [
            Publish(2, "Q", "E", "first"),
            Publish(3, "Q", "E", "second"),
            Delete(4, "old"),
            Fetch(5, "W", durable="w", wait_ms=30_000),
            Ping(6),
            Bye(),
            Publish(7, "Q", "E", "after the BYE: not read"),
        ]
        peer.send(b"".join(encode_frame(r.to_wire()) for r in requests))
        if half_close:
            peer.writer.write_eof()
        loop = asyncio.get_running_loop()
        started = loop.time()
        frames = await until_closed(peer)
        assert loop.time() - started < 5  # (the FETCH did not wait its 30 s)
        assert sorted(frames, key=lambda f: f.req) == [
            PubAck(2, 0), PubAck(3, 1), Ok(4), Batch(5, 0), Pong(6)
        ], frames  # fmt: skip
        async with connected(broker) as c:
            assert [m.payload for m in await c.fetch("Q")] == ["first", "second"]
            info = await c.status()
            assert info["server"]["conn_count"] == 1
            assert "old" not in [q["name"] for q in info["queues"]]
            assert [(d["name"], d["consumers"]) for d in info["durables"]] == [("w", 0)]


async def test_bye_ends_subscriptions_at_once_and_gives_back_what_they_held(tmp_path: Path) -> None:
    """After its BYE a connection gets no DELIVER, only the replies it is
    owed: the record it publishes just before the BYE (its PUBACK comes
    after the fsync) is not delivered to its own subscription, and what that
    subscription held unacked goes to the durable's next consumer at once,
    as on a disconnect (not after the 600 s ack wait)."""
    async with running_broker(tmp_path) as broker, connected(broker, "other") as other:
        peer = await RawPeer.connect(broker)
        peer.send_frame(Subscribe(2, 1, "Q", durable="d", start="earliest", prefetch=10, ack_wait_ms=600_000))
        assert await peer.recv() == Ok(2)
        await other.publish("Q", "E", "held")
        delivered = await asyncio.wait_for(peer.recv(), 5)
        assert isinstance(delivered, Deliver) and delivered.offset == 0
        peer.send(encode_frame(Publish(3, "Q", "E", "sent with the BYE").to_wire()) + encode_frame(Bye().to_wire()))
        assert await until_closed(peer) == [PubAck(3, 1)]
        sub = await other.subscribe("Q", durable="d", prefetch=10)
        got = [await asyncio.wait_for(anext(sub), 5) for _ in range(2)]
        assert sorted((m.offset, m.deliveries) for m in got) == [(0, 2), (1, 1)]
        await sub.close()


async def test_a_wrong_token_and_bye_in_one_write_still_wait_for_auth_failed(tmp_path: Path) -> None:
    """A BYE right after a HELLO with a wrong token: the AUTH_FAILED it is
    owed still comes after the delay that repeated failures earn. (The BYE
    closed at once: a guesser learned a token was wrong without the delay.)"""
    delay = 0.3
    async with running_broker(tmp_path, token="s3cret", auth_failure_delay=delay) as broker:
        for _ in range(3):  # the free failures: answered at once
            with pytest.raises(AuthFailed):
                await Client.open(url_of(broker), token="wrong", reconnect=False)
        peer = await RawPeer.connect(broker, hello=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        hello = Hello(1, PROTOCOL_VERSION, "guess", {"token": "wrong"})
        peer.send(encode_frame(hello.to_wire()) + encode_frame(Bye().to_wire()))
        frames = await until_closed(peer)
        assert [(type(f), f.code) for f in frames] == [(Err, ErrorCode.AUTH_FAILED)], frames
        assert loop.time() - started >= delay


async def test_a_stuck_fsync_holds_a_connection_after_its_bye_for_the_grace_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait for the replies a BYE is owed is bounded by shutdown_grace:
    with the disk's fdatasync stuck, the PUBACKs never come and the
    connection is aborted then, with a warning saying what was owed. (Two
    queues in one read: their fsync goes to the committer thread, not
    inline on the event loop, which the stuck call would block.)"""
    grace = 0.5
    release = threading.Event()
    datasync = os.fdatasync

    def stuck(fd: int) -> None:
        release.wait(30)
        datasync(fd)

    async with running_broker(tmp_path, shutdown_grace=grace) as broker:
        async with connected(broker) as c:
            await c.publish("Q", "E")  # the queues exist: only the next publishes' fsync is stuck
            await c.publish("R", "E")
        peer = await RawPeer.connect(broker)
        monkeypatch.setattr(os, "fdatasync", stuck)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            requests = [Publish(2, "Q", "E"), Publish(3, "R", "E"), Bye()]
            peer.send(b"".join(encode_frame(r.to_wire()) for r in requests))
            assert await until_closed(peer) == []
            assert grace <= loop.time() - started < grace + 2
        finally:
            release.set()
    warned = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "after its BYE" in r.getMessage()
    ]
    assert len(warned) == 1 and "with 2 replies still owed" in warned[0], warned


async def test_a_session_keeps_fewer_than_30_attributes(tmp_path: Path) -> None:
    """CPython 3.11 keeps fewer than 30 instance attributes of a class in its
    fast layout; a 30th Session attribute made every attribute access on the
    publish path slower (+3,900 instructions per window-1 publish in
    bench.instructions, about 3.5%). A structural check, not a timing: a
    session that has said HELLO, subscribed, fetched and published."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.subscribe("Q", durable="d")
        await c.fetch("Q", durable="p", wait=0)
        await c.publish("Q", "E", 1)
        (session,) = broker.sessions
        assert len(vars(session)) < 30, sorted(vars(session))
