"""The broker's behaviour through the real client on a real socket."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from broker import Broker, BrokerConfig
from broker.store import DataDirInUse
from client import Client
from protocol import (
    PROTOCOL_VERSION,
    Ack,
    AuthFailed,
    BadRequest,
    Delete,
    Err,
    ErrorCode,
    FrameType,
    Hello,
    InvalidName,
    Limits,
    Ok,
    PayloadTooLarge,
    Ping,
    Pong,
    PubAck,
    Publish,
    Subscribe,
    Unsubscribe,
    encode_frame,
)
from tests.helpers import RawPeer, assert_broker_healthy, broker_process, connected, running_broker, url_of


async def test_publish_returns_dense_offsets_per_queue(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        offsets = await asyncio.gather(*(c.publish("A", "E", i) for i in range(50)))
        assert sorted(offsets) == list(range(50))
        assert await c.publish("B", "E") == 0
        assert await c.publish_many("A", [("E", 1), ("E", 2, {"h": "v"})]) == [50, 51]


async def test_prefetch_window_is_never_exceeded(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=3)
        await c.publish_many("Q", [("E", i) for i in range(10)])
        # Deliveries are written before the STATUS reply on the same socket.
        info = await c.status()
        assert info["durables"][0]["in_flight"] == 3
        assert sub.pending == 3
        first = await sub.next(timeout=5)
        await first.ack()
        assert [(await sub.next(timeout=5)).payload for _ in range(3)] == [1, 2, 3]
        info = await c.status()
        assert info["durables"][0]["in_flight"] == 3 and info["durables"][0]["ack_floor"] == 1
        assert sub.pending == 0


async def test_durable_resumes_after_reconnect_and_redelivers_unacked(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with connected(broker, "w1") as c:
            sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=5)
            await c.publish_many("Q", [("E", i) for i in range(8)])
            got = [await sub.next(timeout=5) for _ in range(5)]
            for m in got[:2]:
                await m.ack(wait=True)
        async with connected(broker, "w2") as c:
            sub = await c.subscribe("Q", durable="d", prefetch=100)
            got = [await sub.next(timeout=5) for _ in range(6)]
            assert [m.payload for m in got] == [2, 3, 4, 5, 6, 7]
            # The two acks freed credit, so 5 and 6 went out to w1 before it left.
            assert [m.deliveries for m in got] == [2, 2, 2, 2, 2, 1]
            assert [m.redelivered for m in got] == [True] * 5 + [False]


async def test_durable_resumes_after_a_broker_restart(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=4)
        await c.publish_many("Q", [("E", i) for i in range(6)])
        got = [await sub.next(timeout=5) for _ in range(4)]
        await got[0].ack(wait=True)
        await got[2].ack(wait=True)  # out of order: 1 and 3 stay unacked
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", prefetch=100)
        got = [await sub.next(timeout=5) for _ in range(4)]
        # 2 was acked out of order: never again. The acks freed credit for 4 and 5 before the restart.
        assert [(m.payload, m.deliveries) for m in got] == [(1, 2), (3, 2), (4, 2), (5, 2)]


async def test_start_positions(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("E", i) for i in range(5)])
        new = await c.subscribe("Q", durable="new", start="new")
        earliest = await c.subscribe("Q", durable="early", start="earliest")
        at3 = await c.subscribe("Q", durable="at3", start=3)
        await c.publish("Q", "E", 5)
        assert (await new.next(timeout=5)).payload == 5
        assert [(await earliest.next(timeout=5)).payload for _ in range(6)] == list(range(6))
        assert [(await at3.next(timeout=5)).payload for _ in range(3)] == [3, 4, 5]


async def test_ephemeral_subscriptions_are_real_time_only(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("Q", "E", "before")
        sub = await c.subscribe("Q")
        await c.publish("Q", "E", "after")
        msg = await sub.next(timeout=5)
        assert msg.payload == "after" and msg.durable is None
        await msg.ack()  # a no-op, never an error
        await sub.close()
        assert (await c.status())["durables"] == []


async def test_event_filters(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", events=["CREATE", "user.*"], durable="f", start="earliest")
        for event in ["CREATE", "DELETE", "user.created", "user", "users.x", "user.a.b"]:
            await c.publish("Q", event, event)
        got = [(await sub.next(timeout=5)).payload for _ in range(3)]
        assert got == ["CREATE", "user.created", "user.a.b"]
        info = await c.status()
        assert info["durables"][0]["events"] == ["CREATE", "user.*"]


async def test_competing_consumers_share_one_durable(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker, "a") as a, connected(broker, "b") as b:
        sa = await a.subscribe("Q", durable="work", prefetch=10)
        sb = await b.subscribe("Q", durable="work", prefetch=10)
        await a.publish_many("Q", [("E", i) for i in range(20)])
        seen = []
        for sub in (sa, sb):
            for _ in range(10):
                msg = await sub.next(timeout=5)
                seen.append(msg.payload)
                await msg.ack()
        assert sorted(seen) == list(range(20))


async def test_fetch_long_poll_and_plain_reads(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.fetch("Q", durable="p", wait=0) == []
        waiting = asyncio.ensure_future(c.fetch("Q", durable="p", max_messages=10, wait=10))
        await c.ping()  # the FETCH is at the broker now
        await c.publish("Q", "E", "hello")
        batch = await waiting
        assert [m.payload for m in batch] == ["hello"]
        await batch[0].ack(wait=True)
        await c.publish_many("Q", [("E", i) for i in range(5)])
        batch = await c.fetch("Q", durable="p", max_messages=3)
        assert [m.payload for m in batch] == [0, 1, 2]
        for m in batch:
            await m.ack()
        assert [m.payload for m in await c.fetch("Q", durable="p")] == [3, 4]
        # Plain reads remember nothing.
        assert [m.offset for m in await c.fetch("Q", start=2, max_messages=2)] == [2, 3]
        assert [m.offset for m in await c.fetch("Q", start=2, max_messages=2)] == [2, 3]
        # An empty long poll times out with an empty batch.
        assert await c.fetch("Q", start="new", wait=0.05) == []


async def test_a_plain_fetch_of_an_unknown_queue_reads_it_as_empty_and_creates_nothing(tmp_path: Path) -> None:
    """``tidings fetch TYPO`` answers an empty batch and leaves no queue
    behind (it created one, listed by STATUS and kept on disk for ever); a
    FETCH that waits, or a durable's, creates it like a SUBSCRIBE, so the
    publishes it waits for land where it reads."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.fetch("TYPO", max_messages=10) == []
        assert await c.fetch("TYPO", start=5) == []
        assert not (tmp_path / "queues" / "TYPO").exists()
        assert [q["name"] for q in (await c.status())["queues"]] == []
        waiting = asyncio.ensure_future(c.fetch("Q", wait=10))
        await c.ping()  # the FETCH waits at the broker now
        assert await c.publish("Q", "E", "hello") == 0
        assert [m.payload for m in await waiting] == ["hello"]
        assert await c.fetch("D", durable="d") == []
        assert sorted(q["name"] for q in (await c.status())["queues"]) == ["D", "Q"]
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert [m.payload for m in await c.fetch("Q", start=0)] == ["hello"]  # an existing one, as before


async def test_unacked_fetched_messages_come_back_to_the_next_fetcher(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as c:
            await c.publish_many("Q", [("E", i) for i in range(3)])
            batch = await c.fetch("Q", durable="p")
            await batch[0].ack(wait=True)
        async with connected(broker) as c:
            batch = await c.fetch("Q", durable="p")
            assert [(m.payload, m.deliveries) for m in batch] == [(1, 2), (2, 2)]


async def test_status_describes_connections_queues_and_durables(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker, "watcher") as c:
        await c.subscribe("DB", events=["CREATE"], durable="logger", start="earliest", prefetch=7)
        await c.publish_many("DB", [("CREATE", i) for i in range(3)])
        info = await c.status()
        (conn,) = info["connections"]
        assert conn["name"] == "watcher" and conn["address"].startswith("127.0.0.1:") and conn["since"] > 0
        assert conn["producer"] == c.producer_id and len(c.producer_id) == 16
        assert conn["subscriptions"][0] | {"in_flight": 0} == {
            "sub_id": 1, "queue": "DB", "events": ["CREATE"], "durable": "logger", "prefetch": 7, "in_flight": 0,
        }  # fmt: skip
        (queue,) = info["queues"]
        assert (queue["name"], queue["first_offset"], queue["next_offset"], queue["messages"]) == ("DB", 0, 3, 3)
        assert queue["bytes"] > 0
        (durable,) = info["durables"]
        assert (durable["name"], durable["ack_floor"], durable["lag"], durable["in_flight"]) == ("logger", 0, 3, 3)
        assert info["server"]["conn_count"] == 1 and info["server"]["fsync"] == "always"


# --- bad input: a clear error with a stable code; the broker carries on ---------------


async def test_request_errors_keep_the_connection(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker)
        cases = [
            ([int(FrameType.PUBLISH), 2, "../etc", "E", None, None, None], ErrorCode.INVALID_NAME),
            ([int(FrameType.PUBLISH), 3, "Q", "bad event!", None, None, None], ErrorCode.INVALID_NAME),
            (Unsubscribe(4, 99).to_wire(), ErrorCode.UNKNOWN_SUBSCRIPTION),
            (Ack(5, "Q", "nobody", (0,)).to_wire(), ErrorCode.NOT_FOUND),
            ([*Subscribe(6, 1, "Q", prefetch=1).to_wire()[:8], 0, 0, 0, None], ErrorCode.BAD_REQUEST),
            ([int(FrameType.FETCH), 7, "NEW", None, [], 0, 0, "earliest", None, 0], ErrorCode.BAD_REQUEST),
        ]
        for wire, code in cases:
            peer.send_wire(wire)
            reply = await peer.recv()
            assert isinstance(reply, Err) and reply.req == wire[1] and reply.code == code, reply
        peer.send_frame(Ping(10))
        assert await peer.recv() == Pong(10)
        peer.close()
        assert not broker.store.queues  # (no refused request created one: the FETCH did)


async def test_a_record_over_the_limit_is_refused_on_either_publish_path(tmp_path: Path) -> None:
    """A PUBLISH that fits its frame but whose record would not fit a delivery
    is PAYLOAD_TOO_LARGE, on the spliced path (names seen before, no
    headers) and on the general one alike; nothing is stored."""
    async with (
        running_broker(tmp_path, limits=Limits(max_frame_size=4096, handshake_frame_size=4096)) as broker,
        connected(broker) as c,
    ):
        assert await c.publish("Q", "E", b"small") == 0  # the names are known from here on
        for headers in (None, {"h": "1"}):  # spliced, then general
            with pytest.raises(PayloadTooLarge) as info:
                await c.publish("Q", "E", b"x" * 4000, headers=headers)
            assert "exceeds the limit of 3456 bytes" in str(info.value)  # 4096 - 512 - 128 (sequence)
        assert await c.publish("Q", "E", b"small") == 1


async def test_acking_what_was_never_delivered_is_bad_ack(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker)
        peer.send_frame(Subscribe(2, 1, "Q", durable="d"))
        assert await peer.recv() == Ok(2)
        peer.send_frame(Ack(3, "Q", "d", (5,)))
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == ErrorCode.BAD_ACK and "never delivered" in reply.message
        peer.send_frame(Subscribe(4, 1, "Q"))
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == ErrorCode.DUPLICATE_SUBSCRIPTION
        peer.close()


async def test_one_bad_offset_does_not_spoil_a_batched_ack(tmp_path: Path) -> None:
    """The client batches fire-and-forget acks into one ACK frame per flush: a
    stale one (a copy already acked) must not cost the others their ack."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("E", i) for i in range(4)])
        peer = await RawPeer.connect(broker)
        peer.send_frame(Subscribe(2, 1, "Q", durable="d", start="earliest", prefetch=10))
        assert await peer.recv() == Ok(2)
        got = [await peer.recv() for _ in range(4)]
        assert [d.offset for d in got] == [0, 1, 2, 3]  # type: ignore[attr-defined]
        peer.send_frame(Ack(3, "Q", "d", (0,)))
        assert await peer.recv() == Ok(3)
        peer.send_frame(Ack(0, "Q", "d", (1, 0, 2, 9)))  # 0: already acked, 9: never delivered
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.req == 0 and reply.code == ErrorCode.BAD_ACK, reply
        assert "offset 0 is already acknowledged" in reply.message and "offset 9 was never delivered" in reply.message
        assert "2 others acknowledged" in reply.message
        (durable,) = (await c.status())["durables"]
        assert (durable["ack_floor"], durable["in_flight"]) == (3, 1)  # 1 and 2 were acked all the same
        peer.close()


async def test_payload_over_the_frame_limit(tmp_path: Path) -> None:
    """The client refuses to send it at all, and says so with the class the
    broker's refusal has: one ``except PayloadTooLarge`` handles both."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        from protocol import LocalProtocolError

        for publish in (c.publish, lambda q, e, p: c.publish_many(q, [(e, p)])):
            for _ in range(2):  # the second time the names are known: the fast path
                with pytest.raises(PayloadTooLarge) as info:
                    await publish("Q", "E", b"x" * (2 << 20))
                assert isinstance(info.value, LocalProtocolError)  # nothing was sent
                assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE and not info.value.retriable
                assert "exceeds the frame limit of 1048576 bytes" in str(info.value)
                await c.publish("Q", "E", b"names known")


CONNECTION_ERRORS = [
    (b"\x00\x00\x00\x02\xc1\xc1", ErrorCode.MALFORMED_FRAME),
    (b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE),
    (struct.pack(">I", 1) + b"\x90", ErrorCode.MALFORMED_FRAME),  # an empty array
    (struct.pack(">I", 2) + b"\x91\x7f", ErrorCode.MALFORMED_FRAME),  # unknown frame type
    (struct.pack(">I", 3) + b"\x92\x11\x01", ErrorCode.UNEXPECTED_FRAME),  # OK from a client
]


@pytest.mark.parametrize(("data", "code"), CONNECTION_ERRORS)
async def test_connection_errors_answer_err_then_close(tmp_path: Path, data: bytes, code: ErrorCode) -> None:
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker)
        peer.send(data)
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == code and reply.req == 0
        await peer.expect_closed()
        await assert_broker_healthy(broker)
        assert (await _status_conn_count(broker)) == 1


@pytest.mark.parametrize(("data", "code"), CONNECTION_ERRORS)
async def test_requests_before_bad_bytes_in_the_same_read_are_answered_first(
    tmp_path: Path, data: bytes, code: ErrorCode
) -> None:
    """One write, so one read on the broker: a refused PUBLISH, PING, PUBLISH, then the bad bytes."""
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker, producer="p1")
        ping, publish = Ping(7), Publish(8, "Q", "E", "before the bad bytes")
        bad_name = encode_frame([int(FrameType.PUBLISH), 6, "Q", "no spaces", "x", None, None])
        peer.send(bad_name + encode_frame(ping.to_wire()) + encode_frame(publish.to_wire()) + data)
        refused = await peer.recv()  # a request-level ERR first: the PING after it is still answered
        assert isinstance(refused, Err) and refused.req == 6 and refused.code == ErrorCode.INVALID_NAME
        assert await peer.recv() == Pong(7)
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == code and reply.req == 0
        await peer.expect_closed()  # the PUBACK is lost with the connection: a producer resends
        async with connected(broker) as c:
            assert [m.payload for m in await c.fetch("Q", start="earliest")] == ["before the bad bytes"]


async def _status_conn_count(broker) -> int:  # type: ignore[no-untyped-def]
    async with connected(broker) as c:
        return int((await c.status())["server"]["conn_count"])


async def test_handshake_errors(tmp_path: Path) -> None:
    async with running_broker(tmp_path, token="s3cret") as broker:
        peer = await RawPeer.connect(broker, hello=False)
        peer.send_frame(Hello(1, PROTOCOL_VERSION + 1, "future"))
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == ErrorCode.UNSUPPORTED_VERSION
        await peer.expect_closed()

        peer = await RawPeer.connect(broker, hello=False)
        peer.send_frame(PubAck(1, 1))  # not a HELLO
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == ErrorCode.UNEXPECTED_FRAME
        await peer.expect_closed()

        with pytest.raises(AuthFailed, match=r"wrong token$"):
            await Client.open(url_of(broker), token="wrong")
        # No token: said so, with where one goes (it said "invalid or missing token" to both).
        with pytest.raises(AuthFailed, match=r"requires a token and none was given \(tidings --token"):
            await Client.open(url_of(broker))
        async with Client(url_of(broker), token="s3cret") as c:
            assert await c.publish("Q", "E") == 0


async def test_repeated_wrong_tokens_from_one_address_are_answered_ever_more_slowly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RELIABILITY.md A1: three wrong tokens are answered at once (a typo);
    from the fourth on, AUTH_FAILED comes after a delay that doubles (0.2,
    0.4, 0.8 s here), never turned into HANDSHAKE_TIMEOUT by the delay, and
    the right token is served at once meanwhile. One warning says so."""
    async with running_broker(tmp_path, token="s3cret", auth_failure_delay=0.2, handshake_timeout=0.3) as broker:
        loop = asyncio.get_running_loop()
        took = []
        for _ in range(6):
            started = loop.time()
            with pytest.raises(AuthFailed):
                await Client.open(url_of(broker), token="wrong", reconnect=False)
            took.append(loop.time() - started)
        assert all(t < 0.2 for t in took[:3]), took
        # (uvloop's loop.time() is libuv's cached clock, in ms steps: 0.19999... is 0.2)
        assert [t >= d - 0.005 for t, d in zip(took[3:], (0.2, 0.4, 0.8), strict=True)] == [True] * 3, took
        guessing = asyncio.ensure_future(Client.open(url_of(broker), token="wrong", reconnect=False))  # 1.6 s
        async with Client(url_of(broker), token="s3cret", reconnect=False) as c:
            assert await c.publish("Q", "E") == 0
        assert not guessing.done()
        with pytest.raises(AuthFailed):
            await guessing
        await assert_broker_healthy(broker, token="s3cret")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "wrong tokens" in r.getMessage()]
    assert warned == ["127.0.0.1: 4 wrong tokens within a minute: answering this one and each later one more slowly"]


async def test_silent_peers_are_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    async with running_broker(tmp_path, handshake_timeout=0.2) as broker:
        peer = await RawPeer.connect(broker, hello=False)
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == ErrorCode.HANDSHAKE_TIMEOUT
        await peer.expect_closed()


async def test_invalid_names_raise_before_sending(tmp_path: Path) -> None:
    """Our own checks refuse a bad name with the broker's class, InvalidName
    (a bad value: BadRequest), and are LocalProtocolErrors: nothing was sent."""
    from protocol import LocalProtocolError

    async with running_broker(tmp_path) as broker, connected(broker) as c:
        for call in (
            lambda: c.publish("../x", "E"), lambda: c.publish("Q", "bad event"),
            lambda: c.subscribe("Q", durable="a/b"), lambda: c.fetch("Q", events=["no spaces"]),
            lambda: c.seek("Q", ".hidden", "earliest"),
        ):  # fmt: skip
            with pytest.raises(InvalidName) as info:
                await call()
            assert isinstance(info.value, LocalProtocolError) and info.value.code is ErrorCode.INVALID_NAME
        with pytest.raises(BadRequest) as bad:
            await c.subscribe("Q", prefetch=0)
        assert isinstance(bad.value, LocalProtocolError) and bad.value.code is ErrorCode.BAD_REQUEST
        assert await c.publish("Q", "E") == 0


async def test_a_subscriber_that_stops_reading_is_paused_not_buffered(tmp_path: Path) -> None:
    high = 64 * 1024
    async with running_broker(tmp_path, write_high_water=high) as broker:
        sleeper = await RawPeer.connect(broker)
        sleeper.send_frame(Subscribe(2, 1, "Q", durable="slow", prefetch=1 << 20))
        assert await sleeper.recv() == Ok(2)
        # From here on the sleeper reads nothing.
        async with connected(broker, "pub") as c:
            payload = b"x" * 10_000
            for _ in range(10):  # 10 MB in 1,000 confirmed publishes
                await c.publish_many("Q", [("E", payload)] * 100)
            session = next(s for s in broker.sessions if s.name == "raw")
            assert session.write_paused
            # What the broker holds for the sleeper: its write buffer, bounded by
            # the high-water mark plus one pump's worth (never the 10 MB).
            assert session.transport is not None
            assert session.transport.get_write_buffer_size() < high + 1024 * 1024
            info = await c.status()
            durable = info["durables"][0]
            assert durable["lag"] == 1000 and durable["in_flight"] < 1000
        sleeper.close()
        await assert_broker_healthy(broker)


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_fsync_interval_and_never_confirm_at_write(tmp_path: Path, policy: str) -> None:
    from broker.config import FsyncPolicy

    overrides = {"fsync": FsyncPolicy(policy), "fsync_interval": 0.05}
    async with running_broker(tmp_path, **overrides) as broker, connected(broker) as c:
        assert await c.publish_many("Q", [("E", i) for i in range(100)]) == list(range(100))
        if policy == "interval":  # the committer thread syncs the dirty queue within an interval or so
            deadline = asyncio.get_running_loop().time() + 5
            while (await c.status())["server"]["fsyncs"] == 0:
                assert asyncio.get_running_loop().time() < deadline, "no fsync within 5 s"
                await asyncio.sleep(0.01)  # polling the broker's counter
        else:
            assert (await c.status())["server"]["fsyncs"] == 0
    async with running_broker(tmp_path) as broker, connected(broker) as c:  # a clean stop syncs all
        assert [m.payload for m in await c.fetch("Q", start="earliest", max_messages=200)] == list(range(100))


async def test_a_delete_that_finishes_after_the_connection_failed_answers_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DELETE finishes on a worker thread. If the connection broke the
    protocol meanwhile, and its close waits for a full write buffer to
    drain, the OK can no longer be sent: it raised in the task instead
    ("Task exception was never retrieved", with a traceback, at ERROR).
    Found by the session fuzz target."""
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as c:
            await c.publish_many("big", [("e", b"x" * 60_000)] * 200)  # 12 MB: more than the socket buffers
            await c.publish("B", "e")
        peer = await RawPeer.connect(broker)  # and it never reads again
        subscribe = Subscribe(2, 1, "big", (), None, "earliest", None, 1000)
        peer.send(encode_frame(subscribe.to_wire()) + encode_frame(Delete(3, "B").to_wire()) + b"\x00\x00\x00\x01\xc1")
        async with connected(broker) as c:
            for _ in range(500):  # the delete finishes on the worker thread
                if "B" not in [q["name"] for q in (await c.status())["queues"]]:
                    break
                await asyncio.sleep(0.01)  # polling a condition, with a bound
            else:
                raise AssertionError("queue B was not deleted")
            await c.ping()  # (the task ran its last step before this answer)
            gc.collect()  # an unretrieved task exception is reported when its task is freed
            await c.ping()
        peer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_one_data_directory_serves_one_broker_at_a_time(tmp_path: Path) -> None:
    """Two brokers on one directory would both append at the offsets they
    think are next, confirming the same offsets twice (one copy lost): the
    second is refused at start-up, naming the holder, and starts once the
    first has stopped. A broker whose port is taken says so before it
    touches its data directory (it read back the whole directory first, slow
    for a large one), and lets go of everything."""
    async with running_broker(tmp_path) as first, connected(first) as c:
        await c.publish("Q", "E", 0)
        with pytest.raises(DataDirInUse, match=rf"in use by another broker \(pid {os.getpid()}\)"):
            await Broker(BrokerConfig(host="127.0.0.1", port=0, data_dir=tmp_path)).start()
        with pytest.raises(OSError, match=r"(?i)address already in use"):
            await Broker(BrokerConfig(host="127.0.0.1", port=first.address[1], data_dir=tmp_path / "other")).start()
        assert not (tmp_path / "other").exists()
        async with running_broker(tmp_path / "other"):
            pass
    async with running_broker(tmp_path) as again, connected(again) as c:
        assert await c.publish("Q", "E", 1) == 1


def test_a_second_daemon_on_the_same_data_directory_exits_1(tmp_path: Path) -> None:
    """The daemon's view of the lock: ``tidings-broker`` on a directory in use
    exits 1 with the holder's pid, and leaves the holder's data alone."""
    with broker_process(tmp_path) as bp:
        second = subprocess.run(
            [sys.executable, "-m", "broker", "--port", "0", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 1, second
        assert f"cannot start: data directory {tmp_path.resolve()} is in use by another broker (pid {bp.pid})" in (
            second.stderr
        ), second.stderr
        assert "Traceback" not in second.stderr
