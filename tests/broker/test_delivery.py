"""Delivery patterns: ack wait, NACK, work in progress, dead letters,
idempotent publish, competing consumers with a consumer killed mid-stream."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import msgpack
import pytest

from client import Client
from protocol import Ack, Deliver, Ok, PubAck, Publish, ServerError, Subscribe, Unsubscribe, encode_frame
from tests.helpers import RawPeer, assert_broker_healthy, broker_process, connected, running_broker, url_of

FAST = {"cursor_flush": 0.05}  # the ticker that expires ack waits runs this often


async def test_unacked_messages_come_back_after_the_ack_wait(tmp_path: Path) -> None:
    async with running_broker(tmp_path, **FAST) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", ack_wait=0.2)
        await c.publish("Q", "E", "job")
        first = await sub.next(timeout=5)
        started = time.monotonic()
        again = await sub.next(timeout=5)
        assert time.monotonic() - started >= 0.15
        assert (again.offset, again.deliveries, again.redelivered) == (first.offset, 2, True)
        await again.ack(wait=True)


async def test_nack_now_and_later(tmp_path: Path) -> None:
    async with running_broker(tmp_path, **FAST) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d")
        await c.publish("Q", "E", "job")
        await (await sub.next(timeout=5)).nack()
        msg = await sub.next(timeout=5)
        assert msg.deliveries == 2
        started = time.monotonic()
        await msg.nack(delay=0.3)
        msg = await sub.next(timeout=5)
        assert msg.deliveries == 3 and time.monotonic() - started >= 0.25
        await msg.ack(wait=True)


async def test_in_progress_extends_the_ack_wait(tmp_path: Path) -> None:
    async with running_broker(tmp_path, **FAST) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", ack_wait=0.3)
        await c.publish("Q", "E", "slow job")
        msg = await sub.next(timeout=5)
        for _ in range(6):  # 0.6 s of "work", twice the ack wait
            await asyncio.sleep(0.1)
            await msg.in_progress()
        await c.ping()
        assert sub.pending == 0, "redelivered although the work was in progress"
        await msg.ack(wait=True)
        with pytest.raises(ServerError) as info:
            await c._progress("Q", "d", msg.offset)
        assert info.value.code == 26  # BAD_ACK: no longer in flight


async def test_in_progress_keeps_a_redelivery_s_longer_ack_wait(tmp_path: Path) -> None:
    """A redelivery's ack wait is doubled (backoff); PROGRESS restarts that
    longer wait, not the base one (it made the message come back sooner)."""
    async with running_broker(tmp_path, **FAST) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", ack_wait=0.2)
        await c.publish("Q", "E", "slow job")
        await sub.next(timeout=5)
        msg = await sub.next(timeout=5)  # redelivered: this delivery's wait is 0.4 s
        assert msg.deliveries == 2
        started = time.monotonic()
        await msg.in_progress()
        again = await sub.next(timeout=5)
        assert again.deliveries == 3 and time.monotonic() - started >= 0.35


async def test_max_deliveries_moves_a_message_to_the_dead_letter_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("jobs", durable="workers", max_deliveries=3, prefetch=1)
        await c.publish("jobs", "user.created", {"id": 1}, headers={"trace": "t1"})
        await c.publish("jobs", "user.created", {"id": 2})
        for n in (1, 2, 3):
            msg = await sub.next(timeout=5)
            assert (msg.payload, msg.deliveries) == ({"id": 1}, n)
            await msg.nack()
        nxt = await sub.next(timeout=5)  # the poison message is gone; the next one flows
        assert nxt.payload == {"id": 2}
        await nxt.ack(wait=True)
        dead = await c.fetch("jobs.dead", max_messages=10, wait=5)  # stored asynchronously
        assert [m.payload for m in dead] == [{"id": 1}]
        assert dead[0].event == "user.created"
        assert dead[0].headers == {
            "trace": "t1", "x-dead-queue": "jobs", "x-dead-offset": "0", "x-dead-durable": "workers",
            "x-dead-reason": "max_deliveries", "x-deliveries": "3",
        }  # fmt: skip
        info = await c.status()
        (durable,) = [d for d in info["durables"] if d["name"] == "workers"]
        assert durable["ack_floor"] == 2 and durable["lag"] == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "queue jobs created" in said and "queue jobs.dead created" in said  # an operator sees both
    assert "queue jobs, durable workers: 1 message (offset 0) moved to jobs.dead after 3 deliveries" in (
        "\n".join(said)
    )


async def test_an_expired_ack_wait_can_dead_letter_into_a_new_queue(tmp_path: Path) -> None:
    """The ticker that expires ack waits walks the queues; the dead letter it
    causes creates ``jobs.dead`` (a queue added under that walk was a
    RuntimeError, taken for a storage failure: the broker stopped)."""
    async with running_broker(tmp_path, **FAST) as broker, connected(broker) as c:
        sub = await c.subscribe("jobs", durable="w", max_deliveries=1, ack_wait=0.1, prefetch=1)
        await c.publish("jobs", "E", "never acked")
        assert (await sub.next(timeout=5)).deliveries == 1
        deadline = time.monotonic() + 5
        while (await c.status())["queues"][-1]["name"] != "jobs.dead":  # (a FETCH would create it first)
            assert time.monotonic() < deadline and not broker.store.fatal, "no dead letter"
        dead = await c.fetch("jobs.dead", max_messages=10, wait=5)
        assert [(m.payload, m.headers["x-deliveries"]) for m in dead] == [("never acked", "1")]
        assert not broker.store.fatal
        assert await c.publish("jobs", "E", "next") == 1  # still confirming


async def test_dead_letter_queue_can_be_named(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("jobs", durable="w", max_deliveries=1, dead_letter="poison", prefetch=1)
        await c.publish("jobs", "E", "bad")
        await (await sub.next(timeout=5)).nack()
        await c.publish("jobs", "E", "good")
        assert (await sub.next(timeout=5)).payload == "good"
        assert [m.payload for m in await c.fetch("poison", wait=5)] == ["bad"]


async def test_a_refused_fire_and_forget_ack_is_reported_on_its_durable(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        one = await c.subscribe("Q", durable="one")
        two = await c.subscribe("Q", durable="two")
        await c.publish("Q", "E", "job")
        msg = await one.next(timeout=5)
        await (await two.next(timeout=5)).ack()
        await msg.ack()
        await c.ping()  # the acks and their answers came before the PONG
        assert not one.ack_errors and not two.ack_errors
        await c._ack("Q", "one", msg.offset, wait=False)  # again (msg.ack() would not resend): refused
        await c.ping()
        assert [e.code for e in one.ack_errors] == [26] and not two.ack_errors  # BAD_ACK


async def test_idempotent_publish(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        first = await c.publish("orders", "CREATE", {"n": 17}, message_id="order-17")
        again = await c.publish("orders", "CREATE", {"n": 17}, message_id="order-17")
        other = await c.publish("orders", "CREATE", {"n": 18}, message_id="order-18")
        assert (first, again, other) == (0, 0, 1)
        assert [m.payload for m in await c.fetch("orders")] == [{"n": 17}, {"n": 18}]


@pytest.mark.one_loop
async def test_the_dedup_window_is_set_on_the_command_line(tmp_path: Path) -> None:
    """``--dedup-window``: a message id is known that long, then stored again
    (the broker's clock is the subject here, hence the sleep); 0 is refused;
    one shorter than the clients' reconnect deadline is warned about."""
    with broker_process(tmp_path, "--dedup-window", "0.5") as bp:
        warning = "--dedup-window 0.5s is shorter than the clients' default reconnect deadline (60s)"
        assert any(warning in line for line in bp.log), bp.log
        async with Client(bp.url) as c:
            assert await c.publish("orders", "E", 1, message_id="order-1") == 0
            assert await c.publish("orders", "E", 1, message_id="order-1") == 0
            await asyncio.sleep(0.6)
            assert await c.publish("orders", "E", 1, message_id="order-1") == 1
    result = subprocess.run(
        [sys.executable, "-m", "broker", "--dedup-window", "0", "--data-dir", str(tmp_path / "no")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "--dedup-window" in result.stderr, result
    assert not (tmp_path / "no").exists()


async def test_three_competing_consumers_one_killed_midway(tmp_path: Path) -> None:
    total = 10_000
    acks: dict[int, int] = {}
    async with running_broker(tmp_path) as broker, connected(broker, "pub") as pub:
        clients = [await Client.open(url_of(broker), name=f"w{i}") for i in range(3)]
        subs = [await c.subscribe("Q", durable="work", prefetch=50) for c in clients]
        for start in range(0, total, 500):
            await pub.publish_many("Q", [("E", i) for i in range(start, start + 500)])

        async def work(i: int) -> None:
            sub = subs[i]
            while sum(acks.values()) < total:
                try:
                    msg = await sub.next(timeout=0.5)
                except TimeoutError:
                    continue
                if i == 0 and sum(acks.values()) > total // 3:
                    clients[0].abort()  # killed mid-stream, holding unacked messages
                    return
                if i == 0:
                    await msg.ack(wait=True)  # so we know exactly which acks landed
                else:
                    await msg.ack()
                acks[msg.offset] = acks.get(msg.offset, 0) + 1

        await asyncio.gather(*(work(i) for i in range(3)))
        assert sorted(acks) == list(range(total))
        assert set(acks.values()) == {1}, "a message was acked twice"
        for c in clients[1:]:
            await c.aclose()
        info = await pub.status()
        (durable,) = info["durables"]
        assert (durable["ack_floor"], durable["lag"], durable["in_flight"]) == (total, 0, 0)


async def test_idempotent_publish_survives_a_restart_and_a_repeat_in_one_write(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        offsets = await asyncio.gather(*(c.publish("orders", "E", i, message_id="same") for i in range(5)))
        assert offsets == [0] * 5  # pipelined in one write: stored once
        msg = (await c.fetch("orders"))[0]
        assert msg.headers == {"x-message-id": "same"}
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish("orders", "E", 0, message_id="same") == 0
        assert await c.publish("orders", "E", 1, message_id="other") == 1


async def test_a_forged_message_id_header_is_dropped(tmp_path: Path) -> None:
    """x-message-id is the broker's: one sent in headers is not stored, so a
    restart does not take it for an id and swallow a later real message_id
    publish as a duplicate. A real message_id replaces a forged one."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish("Q", "E", "forged", headers={"x-message-id": "S", "k": "v"}) == 0
        assert await c.publish("Q", "E", "both", headers={"x-message-id": "T"}, message_id="U") == 1
        assert [m.headers for m in await c.fetch("Q")] == [{"k": "v"}, {"x-message-id": "U"}]
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish("Q", "E", "real", message_id="S") == 2  # stored, not a duplicate of 0
        assert await c.publish("Q", "E", "again", message_id="U") == 1  # the real id survived


async def test_timestamps_never_decrease_when_the_clock_goes_back(tmp_path: Path) -> None:
    """A wall clock set back an hour, while the broker runs and while it is
    down, does not make a queue's delivered timestamps decrease (SPEC
    section 4): the stamp in the record body is clamped like the log's."""
    real = time.time
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("Q", "E", 0)
        with mock.patch("time.time", lambda: real() - 3600):
            await c.publish("Q", "E", 1)
            await c.publish("Q", "E", 2)  # a later read: its own clock reading
    with mock.patch("time.time", lambda: real() - 7200):
        async with running_broker(tmp_path) as broker, connected(broker) as c:
            await c.publish("Q", "E", 3)
            stamps = [m.timestamp for m in await c.fetch("Q", max_messages=10)]
    assert len(stamps) == 4 and stamps == sorted(stamps), stamps
    assert stamps[0] > (real() - 60) * 1000  # the first is the real time


async def test_a_producer_resend_is_stored_once(tmp_path: Path) -> None:
    """HELLO names a producer; its PUBLISH reqs are its sequence: a resend on a
    new connection (same producer, same req) is confirmed with the first
    offset, also after a restart; other producers and plain sessions are not
    affected, and only the broker writes the x-producer-seq header."""

    async def publish(peer: RawPeer, *reqs: int, headers: dict[str, str] | None = None) -> list[tuple[int, int, bool]]:
        for req in reqs:
            peer.send_frame(Publish(req, "Q", "E", req, headers))
        acks = [await peer.recv() for _ in reqs]
        assert all(isinstance(a, PubAck) for a in acks), acks
        return sorted((a.req, a.offset, a.duplicate) for a in acks)  # type: ignore[attr-defined]

    async with running_broker(tmp_path) as broker:
        first = await RawPeer.connect(broker, producer="p1")
        assert await publish(first, 5, 6, 7) == [(5, 0, False), (6, 1, False), (7, 2, False)]
        first.close()
        again = await RawPeer.connect(broker, producer="p1")  # reconnected: resends 6 and 7
        assert await publish(again, 6, 7, 8) == [(6, 1, True), (7, 2, True), (8, 3, False)]
        other = await RawPeer.connect(broker, producer="p2")
        assert await publish(other, 6) == [(6, 4, False)]
        plain = await RawPeer.connect(broker)
        assert await publish(plain, 6) == [(6, 5, False)]
        assert await publish(plain, 6) == [(6, 6, False)]
        assert await publish(plain, 9, headers={"x-producer-seq": "p1:100", "k": "v"}) == [(9, 7, False)]
        for peer in (again, other, plain):
            peer.close()
    async with running_broker(tmp_path) as broker:  # rebuilt from the log
        peer = await RawPeer.connect(broker, producer="p1")
        assert await publish(peer, 7, 100) == [(7, 2, True), (100, 8, False)]
        peer.close()
        queue = broker.store.get("Q", create=False)
        assert queue is not None
        records = queue.log.read(0, max_count=20, max_bytes=1 << 20)
        stored = [list(msgpack.Unpacker(io.BytesIO(body)))[2] or {} for _, _, body in records]
        async with connected(broker) as c:  # the client leaves the broker's header out
            seen = [m.headers for m in await c.fetch("Q", max_messages=20)]
    # The first record of each run of consecutive reqs stored together says "PRODUCER:FIRST-LAST".
    sequences: dict[int, str] = {}
    for offset, headers in enumerate(stored):
        producer, _, run = headers.get("x-producer-seq", ":").rpartition(":")
        first, _, last = run.partition("-")
        for i, seq in enumerate(range(int(first), int(last or first) + 1) if first else ()):
            sequences[offset + i] = f"{producer}:{seq}"
    assert sequences == {0: "p1:5", 1: "p1:6", 2: "p1:7", 3: "p1:8", 4: "p2:6", 8: "p1:100"}
    assert stored[7] == {"k": "v"}  # the client's x-producer-seq was dropped
    assert seen == [{}] * 7 + [{"k": "v"}, {}]


async def test_a_sequence_a_queue_never_stored_is_stored(tmp_path: Path) -> None:
    """A req at or below the producer's last one in this queue that the queue
    never stored (it went to another queue) is new here, not a duplicate."""
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker, producer="p")
        for req, queue in ((10, "A"), (11, "B"), (12, "A"), (13, "B")):
            peer.send_frame(Publish(req, queue, "E", req))
            ack = await peer.recv()
            assert isinstance(ack, PubAck) and not ack.duplicate
        peer.close()
        again = await RawPeer.connect(broker, producer="p")
        expected = [(11, 2, False), (12, 1, True), (13, 3, False), (9, 4, False), (12, 1, True)]
        for req, offset, duplicate in expected:
            again.send_frame(Publish(req, "A", "E", req))
            ack = await again.recv()
            assert isinstance(ack, PubAck)
            assert (ack.req, ack.offset, ack.duplicate) == (req, offset, duplicate)
        again.close()


async def test_a_resend_over_a_damaged_record_is_stored_again_and_the_broker_carries_on(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker, producer="p")
        for req in (10, 11):
            peer.send_frame(Publish(req, "Q", "E", "x" * 50))
            assert isinstance(await peer.recv(), PubAck)
        peer.close()
        end = broker.store.queues["Q"].log.size_bytes  # the file goes on with zeros (preallocated)
        with open(tmp_path / "queues" / "Q" / f"{0:020d}.log", "r+b") as f:  # bit rot in the last record
            f.seek(end - 5)
            byte = f.read(1)
            f.seek(end - 5)
            f.write(bytes([byte[0] ^ 0xFF]))
        again = await RawPeer.connect(broker, producer="p")
        again.send_frame(Publish(11, "Q", "E", "x" * 50))
        ack = await again.recv()
        assert isinstance(ack, PubAck) and (ack.offset, ack.duplicate) == (2, False)
        again.close()
        await assert_broker_healthy(broker)


async def test_a_long_resend_interleaved_with_another_producer(tmp_path: Path) -> None:
    """The broker finds each resent sequence in the log (a backward scan over
    several read batches, the other producer's records in between)."""
    async with running_broker(tmp_path) as broker:
        a = await RawPeer.connect(broker, producer="a")
        b = await RawPeer.connect(broker, producer="b")
        reqs = range(10, 3010)
        for req in reqs:
            a.send_frame(Publish(req, "Q", "E", req))
            b.send_frame(Publish(req, "Q", "E", req))
        offsets = {}
        for _ in reqs:
            ack = await a.recv()
            assert isinstance(ack, PubAck) and not ack.duplicate
            offsets[ack.req] = ack.offset
            assert isinstance(await b.recv(), PubAck)
        a.close()
        resent = await RawPeer.connect(broker, producer="a")
        for req in [*reqs[500:], 5000]:
            resent.send_frame(Publish(req, "Q", "E", req))
        got = {}
        for _ in range(len(reqs) - 500 + 1):
            ack = await resent.recv()
            assert isinstance(ack, PubAck)
            got[ack.req] = (ack.offset, ack.duplicate)
        assert got.pop(5000) == (6000, False)
        assert got == {req: (offsets[req], True) for req in reqs[500:]}
        resent.close()
        b.close()


async def test_deleting_a_durable_and_a_queue(tmp_path: Path) -> None:
    from protocol import NotFound

    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest")
        await c.publish_many("Q", [("E", i) for i in range(3)])
        with pytest.raises(ServerError) as info:
            await c.delete_durable("Q", "d")
        assert info.value.code == 28 and "in use" in str(info.value)  # CONFLICT
        with pytest.raises(ServerError) as info:
            await c.delete_queue("Q")
        assert info.value.code == 28
        await sub.close()
        await c.delete_durable("Q", "d")
        with pytest.raises(NotFound):
            await c.delete_durable("Q", "d")
        assert (await c.status())["durables"] == []
        # Recreated from scratch: a new durable starts where it is told to.
        again = await c.subscribe("Q", durable="d", start="earliest")
        assert (await again.next(timeout=5)).offset == 0
        await again.close()
        await c.delete_queue("Q")
        assert not (tmp_path / "queues" / "Q").exists()
        assert (await c.status())["queues"] == []
        with pytest.raises(NotFound):
            await c.delete_queue("Q")
        assert await c.publish("Q", "E", "fresh") == 0  # a new queue, from offset 0
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert [m.payload for m in await c.fetch("Q")] == ["fresh"]


async def test_deleting_a_queue_with_publishes_in_flight(tmp_path: Path) -> None:
    """The delete closes the log only after the committer synced (and confirmed) it:
    an fsync racing the close would fail (EBADF), which is fatal."""
    async with running_broker(tmp_path) as broker, connected(broker) as pub, connected(broker) as admin:
        for round_ in range(30):
            await pub.publish("Q", "E", round_)  # the queue exists
            inflight = asyncio.ensure_future(pub.publish_many("Q", [("E", i) for i in range(200)]))
            await asyncio.sleep(0)  # let the publishes go out
            try:
                await admin.delete_queue("Q")
            except ServerError as exc:  # CONFLICT: a previous round's delete still running
                assert exc.code == 28, exc
            try:
                await inflight  # confirmed (stored, then deleted) or refused while deleting
            except ServerError as exc:
                assert exc.code == 28, exc
            assert not broker.store.fatal
        await assert_broker_healthy(broker, baseline=2)


async def test_a_puller_blocks_seek_and_delete_only_while_it_holds_messages(tmp_path: Path) -> None:
    """A connection that FETCHed from a durable stays attached to it, but
    once it has acked what it took it holds nothing: SEEK and DELETE of the
    durable (and of its queue) go ahead, from that connection or another.
    With a fetched message unacked they are CONFLICT (it used to be CONFLICT
    for the rest of the connection's life)."""
    async with running_broker(tmp_path) as broker, connected(broker) as c, connected(broker) as other:
        await c.publish_many("Q", [("E", i) for i in range(4)])
        (held,) = await c.fetch("Q", durable="d", start="earliest", max_messages=1)
        for request in (other.seek("Q", "d", "earliest"), c.seek("Q", "d", 3), other.delete_durable("Q", "d")):
            with pytest.raises(ServerError) as info:
                await request
            assert info.value.code == 28  # CONFLICT: in use
        await held.ack()
        await c.seek("Q", "d", 2)  # the same connection
        assert [m.offset for m in await c.fetch("Q", durable="d", max_messages=5)] == [2, 3]
        await c.ack_upto("Q", "d", 3)
        await other.seek("Q", "d", "earliest")  # another one
        for m in await c.fetch("Q", durable="d", max_messages=5):
            await m.ack()
        await c.ping()  # (the acks, never answered, are handled before the PONG)
        await other.delete_durable("Q", "d")
        assert "d" not in broker.store.queues["Q"].groups
        assert len(await c.fetch("Q", durable="d2", max_messages=5)) == 4
        await c.ack_upto("Q", "d2", 3)
        await other.delete_queue("Q")
        assert "Q" not in broker.store.queues


async def test_a_conflict_names_the_connections_that_hold_the_durable(tmp_path: Path) -> None:
    """SEEK and DELETE of a durable in use say who holds it, and how, so that
    an operator knows which connection to stop (it said only "in use by 1
    consumer", while STATUS counted no consumer for a connection that held
    fetched messages)."""
    async with (
        running_broker(tmp_path) as broker,
        connected(broker, "worker") as worker,
        connected(broker, "api") as api,
        connected(broker, "admin") as admin,
    ):
        await worker.publish_many("hq", [("e", i) for i in range(4)])
        await worker.fetch("hq", durable="hd", start="earliest", max_messages=2)
        for request in (lambda: admin.seek("hq", "hd", "earliest"), lambda: admin.delete_durable("hq", "hd")):
            with pytest.raises(ServerError) as info:
                await request()
            assert (info.value.code, info.value.message) == (
                28, f"durable 'hd' is in use by 1 consumer: conn {worker.conn_id} 'worker' (2 fetched messages unacked)"
            )  # fmt: skip
        sub = await api.subscribe("hq", durable="hd")
        with pytest.raises(ServerError) as info:
            await admin.seek("hq", "hd", "earliest")
        assert info.value.message == (
            f"durable 'hd' is in use by 2 consumers: conn {worker.conn_id} 'worker' (2 fetched messages unacked), "
            f"conn {api.conn_id} 'api' (subscription {sub.sub_id})"
        )


async def test_seek_rewinds_and_skips_a_durable(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("E", i) for i in range(10)])
        sub = await c.subscribe("Q", durable="d", start="earliest")
        for _ in range(10):
            await (await sub.next(timeout=5)).ack()
        with pytest.raises(ServerError) as info:
            await c.seek("Q", "d", "earliest")
        assert info.value.code == 28  # CONFLICT: in use
        await sub.close()
        await c.seek("Q", "d", 4)  # rewind
        sub = await c.subscribe("Q", durable="d")
        got = [await sub.next(timeout=5) for _ in range(6)]
        assert [m.offset for m in got] == list(range(4, 10))
        await sub.close()
        await c.seek("Q", "d", "new")  # skip everything
        info2 = (await c.status())["durables"][0]
        assert (info2["ack_floor"], info2["lag"], info2["in_flight"]) == (10, 0, 0)
    async with running_broker(tmp_path) as broker, connected(broker) as c:  # the seek was persisted
        assert (await c.status())["durables"][0]["ack_floor"] == 10


async def test_redeliveries_after_the_ack_wait_back_off(tmp_path: Path) -> None:
    async with running_broker(tmp_path, cursor_flush=0.01) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", ack_wait=0.1)
        await c.publish("Q", "E", "nobody acks me")
        times = []
        for n in range(1, 5):
            msg = await sub.next(timeout=10)
            assert msg.deliveries == n
            times.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # ack wait 0.1 s, then 0.2, then 0.4: each gap at least the doubled wait
        assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39, gaps


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "shared"])
async def test_acks_sent_with_the_unsubscribe_take_no_more_messages(tmp_path: Path, shared: bool) -> None:
    """A subscriber that acks what it took and unsubscribes in one write
    (the client's ``sub.close()``, ``tidings sub -n``) is not sent more for
    those acks: the messages after them stay unseen, their delivery count
    untouched, for the next consumer; a subscriber sharing the durable gets
    them. (The broker refilled the window on the ACK before it read the
    UNSUBSCRIBE, then took those messages back, each with one more delivery
    counted: closing a subscription on a busy queue moved up to prefetch
    messages towards max_deliveries and the dead-letter queue unseen.)"""
    async with running_broker(tmp_path) as broker, connected(broker, "pub") as pub:
        await pub.publish_many("Q", [("E", i) for i in range(10)])
        held = []
        if shared:  # it holds offset 0 unacked (prefetch 1), so the peer starts at 1
            other = await pub.subscribe("Q", durable="d", start="earliest", prefetch=1)
            held.append(await other.next(5))
        peer = await RawPeer.connect(broker)
        peer.send_frame(Subscribe(1, 7, "Q", durable="d", start="earliest", prefetch=3))
        assert await peer.recv() == Ok(1)
        taken = [await peer.recv() for _ in range(3)]
        assert all(isinstance(f, Deliver) for f in taken), taken
        offsets = tuple(f.offset for f in taken)
        peer.send(encode_frame(Ack(2, "Q", "d", offsets).to_wire()) + encode_frame(Unsubscribe(3, 7).to_wire()))
        assert [await peer.recv(), await peer.recv()] == [Ok(2), Ok(3)]  # no DELIVER between them
        peer.close()
        rest = [o for o in range(10) if o not in offsets and o not in (m.offset for m in held)]
        if shared:
            await held[0].ack()
            got = []
            for _ in rest:
                got.append(await other.next(5))
                await got[-1].ack()
            await other.close()
        else:
            got = await pub.fetch("Q", durable="d", max_messages=100)
        assert [(m.offset, m.deliveries) for m in got] == [(o, 1) for o in rest]
