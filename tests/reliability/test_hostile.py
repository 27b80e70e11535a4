"""No client can take the broker down (R9, R10): random and structure-aware
bad frames, huge length prefixes, slow drips, silent peers, dead peers. After
each case a control client gets PONG promptly and the connection count
returns to its baseline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker, faults
from broker.session import Session
from client import Client, ServerError
from protocol import (
    PROTOCOL_VERSION,
    Err,
    ErrorCode,
    FrameType,
    Hello,
    Ok,
    Ping,
    Pong,
    Subscribe,
    Welcome,
    encode_frame,
)
from tests.helpers import RawPeer, assert_broker_healthy, connected, running_broker, url_of
from tests.protocol.strategies import PAYLOADS, SCALARS

SOAK = bool(os.environ.get("TIDINGS_SOAK"))


async def throw(broker: Broker, data: bytes, *, hello: bool) -> None:
    """Send ``data`` on a fresh connection, read whatever comes back, hang up."""
    peer = await RawPeer.connect(broker, hello=hello)
    peer.send(data)
    peer.writer.write_eof()
    with_timeout = asyncio.wait_for(peer.expect_closed(), 5)
    try:
        await with_timeout
    except (ConnectionError, TimeoutError):
        pass
    finally:
        peer.close()


def run_against_one_broker(examples: int, strategy: st.SearchStrategy[Any], hello: bool, tmp_path: Path) -> None:
    """Run a hypothesis search of hostile inputs against one broker (one event loop)."""

    async def main() -> None:
        async with running_broker(tmp_path) as broker:
            loop = asyncio.get_running_loop()
            cases: list[bytes] = []

            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(strategy)
            def collect(data: bytes) -> None:
                cases.append(data)

            collect()
            for data in cases:
                await throw(broker, data, hello=hello)
            # PONG within 100 ms, and every hostile connection is gone.
            await assert_broker_healthy(broker)
            assert loop.is_running()

    import uvloop

    uvloop.run(main())


def test_random_bytes_before_and_after_the_handshake(tmp_path: Path) -> None:
    n = 10_000  # the T1 figure; each example is its own connection
    run_against_one_broker(n // 2, st.binary(max_size=300), False, tmp_path / "a")
    run_against_one_broker(n // 2, st.binary(max_size=300), True, tmp_path / "b")


WIRE = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), PAYLOADS)
FRAMES = st.builds(
    lambda t, fields: encode_frame([t, *fields]),
    st.one_of(st.sampled_from([int(t) for t in FrameType]), st.integers(-5, 300)),
    st.lists(WIRE, max_size=13),
)


def test_structure_aware_bad_frames(tmp_path: Path) -> None:
    n = 5000
    run_against_one_broker(n, st.lists(FRAMES, min_size=1, max_size=4).map(b"".join), True, tmp_path)


async def test_a_length_prefix_of_four_gigabytes(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        for hello in (False, True):
            peer = await RawPeer.connect(broker, hello=hello)
            peer.send(struct.pack(">I", (1 << 32) - 1) + b"x" * 1000)
            reply = await peer.recv()
            assert isinstance(reply, Err) and reply.code == ErrorCode.FRAME_TOO_LARGE
            await peer.expect_closed()
        await assert_broker_healthy(broker)


async def test_a_slow_drip_is_served_byte_by_byte(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker, hello=False)
        for frame, reply_type in ((Hello(1, PROTOCOL_VERSION, "drip"), Welcome), (Ping(2), Pong)):
            wire = encode_frame(frame.to_wire())
            for i in range(len(wire)):
                peer.send(wire[i : i + 1])
                await peer.writer.drain()
                if i == len(wire) // 2:
                    await assert_broker_healthy(broker, baseline=1)  # others are served while one drips
            assert isinstance(await peer.recv(), reply_type)
        peer.close()
        await assert_broker_healthy(broker)


async def test_a_peer_that_never_answers_heartbeats_is_dropped(tmp_path: Path) -> None:
    """What a SIGSTOPped client looks like from the broker: it sends nothing, reads nothing."""
    async with running_broker(tmp_path, heartbeat=0.1) as broker:
        peer = await RawPeer.connect(broker)
        peer.send_frame(Subscribe(2, 1, "Q", durable="d"))
        assert await peer.recv() == Ok(2)
        frames: list[Any] = []
        try:
            while True:  # PINGs arrive (recv skips them), then the ERR, then EOF
                frames.append(await asyncio.wait_for(peer.recv(), 5))
        except ConnectionError:
            pass
        assert any(isinstance(f, Err) and f.code == ErrorCode.HEARTBEAT_TIMEOUT for f in frames), frames
        peer.close()
        async with connected(broker) as c:
            info = await c.status()
            assert info["server"]["conn_count"] == 1
            assert info["durables"][0]["consumers"] == 0
        await assert_broker_healthy(broker)


#: A real client in its own process: a durable subscriber with prefetch N that
#: never acks. It prints the offsets it holds, then waits to be stopped.
HOLDER = """
import asyncio, sys
from client import Client

async def main(url, n):
    async with Client(url, name="stopped", reconnect=False) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=n, ack_wait=600)
        held = []
        async for msg in sub:
            held.append(msg.offset)
            if len(held) == n:
                print(*held, flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_a_sigstopped_client_is_dropped_and_its_messages_go_to_another_consumer(tmp_path: Path) -> None:
    """L9: a client process that stops (SIGSTOP) is dropped after the heartbeat
    misses, and what it held unacked goes to another consumer of its durable
    (not after the ack wait: that is 600 s here)."""
    heartbeat, n = 0.2, 5
    async with running_broker(tmp_path, heartbeat=heartbeat) as broker, connected(broker, "other") as other:
        await other.publish_many("Q", [("E", i) for i in range(n)])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, url_of(broker), str(n), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)  # it holds all n, unacked
            assert line.split() == [str(i).encode() for i in range(n)], line
            sub = await other.subscribe("Q", durable="d", prefetch=100)
            durable = (await other.status())["durables"][0]
            assert (durable["consumers"], durable["in_flight"]) == (2, n)  # nothing left for `other`
            os.kill(proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            redelivered = [await asyncio.wait_for(anext(sub), 10) for _ in range(n)]
            took = time.monotonic() - stopped
            assert sorted(m.offset for m in redelivered) == list(range(n))
            assert all(m.deliveries == 2 for m in redelivered)
            # One check finds it silent and PINGs, the next finds no PONG: within
            # 3 heartbeats of the stop (plus scheduling slack), never before one.
            assert heartbeat <= took < 3 * heartbeat + 1.0, took
            for m in redelivered:
                await m.ack()
            info = await other.status()
            assert [c["name"] for c in info["connections"]] == ["other"]
            assert info["durables"][0]["consumers"] == 1
            await sub.close()
        finally:
            if proc.returncode is None:
                proc.kill()  # SIGKILL ends a stopped process too (no SIGCONT: it may be reaped already)
            await proc.wait()
        await assert_broker_healthy(broker, baseline=1)  # `other` is still connected
    print(f"SIGSTOPped client dropped and its {n} messages redelivered {took * 1000:.0f} ms after the stop")


async def test_many_idle_connections(tmp_path: Path) -> None:
    n = 10_000 if SOAK else 1000
    # Both ends live in this process: two descriptors per connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 200 <= hard or (hard == resource.RLIM_INFINITY and soft < 2 * n + 200):
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 200, hard))
    n = min(n, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)
    async with running_broker(tmp_path, max_connections=n + 10) as broker:
        peers = []
        for _ in range(n):
            peers.append(await RawPeer.connect(broker))
        assert len(broker.sessions) == n
        await assert_broker_healthy(broker, baseline=n)
        for peer in peers:
            peer.close()
        await assert_broker_healthy(broker)


async def test_a_bug_in_a_handler_answers_internal_and_ends_only_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that raises (the ``status`` fault: a stand-in for a bug of
    ours) answers its request ERR INTERNAL, logs the traceback and closes
    that one connection. The client reconnects and goes on; another client's
    subscription and the stored messages are untouched."""
    faults.configure("status:bug")  # the first STATUS raises, later ones do not
    try:
        async with running_broker(tmp_path) as broker:
            async with connected(broker, name="bystander") as other, connected(broker, name="victim") as c:
                sub = await other.subscribe("Q", durable="d")
                assert await c.publish("Q", "E", 0) == 0
                with pytest.raises(ServerError) as info:
                    await c.status()
                assert info.value.code == ErrorCode.INTERNAL
                assert await c.publish("Q", "E", 1) == 1  # on the reconnected connection
                names = sorted(conn["name"] for conn in (await c.status())["connections"])
                assert names == ["bystander", "victim"]
                got = [await asyncio.wait_for(anext(sub), 10) for _ in range(2)]
                assert [m.payload for m in got] == [0, 1]
            await assert_broker_healthy(broker)
    finally:
        faults.configure(None)
    failed = [r for r in caplog.records if "internal error handling request" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "injected bug at status" in str(failed[0].exc_info[1])


async def _feed(pub: Client, session: Session) -> None:
    """Publish 10 kB messages for as long as ``session`` is connected."""
    payload = b"x" * 10_000
    while not session.closed:
        await pub.publish_many("Q", [("E", payload)] * 20)


async def _fall_behind(
    broker: Broker, pub: Client, rcvbuf: int | None = None
) -> tuple[RawPeer, Session, asyncio.Task[None]]:
    """A raw subscriber that reads nothing, fed by ``pub`` until the broker
    stops writing to it (and reading); ``rcvbuf`` caps its receive buffer."""
    peer = await RawPeer.connect(broker, rcvbuf=rcvbuf)
    peer.send_frame(Subscribe(2, 1, "Q", prefetch=65535))
    assert await peer.recv() == Ok(2)
    (session,) = [s for s in broker.sessions if s.name == "raw"]
    feeder = asyncio.create_task(_feed(pub, session))
    await _until(lambda: session.write_paused)
    return peer, session, feeder


async def _until(predicate: Callable[[], bool], deadline: float = 10.0) -> None:
    async with asyncio.timeout(deadline):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.one_loop
async def test_a_subscriber_is_dropped_as_slow_only_after_one_whole_timeout_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """L3: a subscriber whose buffer stays full for ``slow_consumer_timeout``
    is sent SLOW_CONSUMER and dropped. The deadline is per stretch: one that
    caught up in time starts a new one when it falls behind again (the first
    stretch's timer used to fire during the second and drop it early, and to
    hold the transport of a closed connection until it fired)."""
    timeout = 1.5
    async with running_broker(tmp_path, slow_consumer_timeout=timeout) as broker, connected(broker, "pub") as pub:
        peer, session, feeder = await _fall_behind(broker, pub)
        first = time.monotonic()
        await asyncio.sleep(timeout / 3)  # (the timer under test: behind for a third of it)
        while session.write_paused:  # catch up, then read no more
            assert await peer.reader.read(1 << 20)
        caught_up = time.monotonic()
        await asyncio.sleep(first + timeout + 0.3 - time.monotonic())  # past the first stretch's deadline
        assert not session.closed, "dropped before a whole timeout went by unread"
        await _until(lambda: session.closed, timeout + 10)  # the second stretch's deadline comes
        assert time.monotonic() - caught_up >= timeout
        await feeder
        with contextlib.suppress(ConnectionError):  # (reset: the unread output was dropped)
            while await peer.reader.read(1 << 20):
                pass
        peer.close()
        await assert_broker_healthy(broker, baseline=1)
    slow = [r.getMessage() for r in caplog.records if "slow consumer" in r.getMessage()]
    assert len(slow) == 1, slow


@pytest.mark.one_loop
async def test_a_subscriber_behind_on_reading_is_not_taken_for_silent(tmp_path: Path) -> None:
    """While the broker has stopped reading from a peer (its buffer is full),
    the peer's frames wait in the socket unheard: that is not silence. A
    subscriber four heartbeat intervals behind, within the slow-consumer
    timeout, keeps its connection and carries on once it reads again. (The
    broker counted those intervals as silent and dropped it with
    HEARTBEAT_TIMEOUT after two, whatever slow_consumer_timeout said.)"""
    heartbeat = 0.25
    async with (
        running_broker(tmp_path, heartbeat=heartbeat, slow_consumer_timeout=30.0) as broker,
        connected(broker, "pub") as pub,
    ):
        # A capped receive buffer: what waits ahead of a broker's PING once the
        # peer reads again is then read in well under an interval. (Autotuned up
        # to 32 MiB on some kernels, it took longer than two of them.)
        peer, session, feeder = await _fall_behind(broker, pub, rcvbuf=1 << 16)
        behind = time.monotonic()
        await asyncio.sleep(4 * heartbeat)  # (the timer under test: four intervals unread)
        assert session.write_paused and time.monotonic() - behind >= 4 * heartbeat
        assert not session.closed, "dropped for silence while the broker was not reading"
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        peer.send_frame(Ping(9))
        while (frame := await asyncio.wait_for(peer.recv(pings=True), 10)) != Pong(9):
            assert not isinstance(frame, Err), frame
            if isinstance(frame, Ping):  # as a live client does while it catches up
                peer.send_frame(Pong(frame.req))
        assert not session.closed
        peer.close()
        await assert_broker_healthy(broker, baseline=1)
