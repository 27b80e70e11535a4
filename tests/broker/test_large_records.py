"""Records near the frame limit, end to end: stored, read back from disk, fetched.

A PUBLISH may carry a record up to the frame limit (1 MiB by default), four
times the log's read chunk (256 KiB), so such records are read back from
disk in more than one piece. After a restart nothing is in memory: every
read goes to the log.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from broker import BrokerConfig
from broker.config import RECORD_ROOM
from broker.publishing import SEQUENCE_HEADER_ROOM
from client import ServerError
from protocol import Batch, ErrorCode, Fetch, FrameDecoder, Limits, Nack, Ok, PubAck, Publish, Record, encode_record
from protocol.wire import BATCH_OVERHEAD, BATCH_RECORD_OVERHEAD
from tests.helpers import RawPeer, connected, running_broker

#: Payload sizes: around and above a read chunk (256 KiB), small ones
#: between them, and close to the largest a PUBLISH may carry under the 1 MiB
#: frame limit (the record body is the payload plus ~40 bytes).
SIZES = [300_000, 20, 900_000, 1_047_800, 20, 300_000]


def _payload(i: int, size: int) -> bytes:
    return b"<%04d>" % i + b"." * size


def _cost(record: Record) -> int:
    """What a record takes in a BATCH at most: its stored body and its entry."""
    body = encode_record(record.event, record.timestamp, record.headers, record.payload)
    return len(body) + BATCH_RECORD_OVERHEAD


async def test_large_records_read_back_from_disk_after_a_restart(tmp_path: Path) -> None:
    """Records longer than a read chunk are served after a restart: to a
    FETCH (plain and durable) and to a push subscriber catching up; and a
    restart within the dedup window, which reads them back to rebuild it,
    serves the queue. They used to read back as damaged ("short"): FETCH got
    QUEUE_CORRUPT, and within the window the queue was refused at start-up."""
    payloads = [_payload(i, size) for i, size in enumerate(SIZES)]
    async with running_broker(tmp_path) as broker, connected(broker) as client:
        for i, payload in enumerate(payloads):
            assert await client.publish("Q", "E", payload, message_id=f"m{i}") == i

    # Past the dedup window (a millisecond): start-up reads nothing back, the readers do.
    async with running_broker(tmp_path, dedup_window=0.001) as broker, connected(broker) as client:
        plain = [m for i in range(len(payloads)) for m in await client.fetch("Q", max_messages=1, start=i)]
        assert [(m.offset, m.payload) for m in plain] == list(enumerate(payloads))
        pulled = []
        while len(pulled) < len(payloads):
            batch = await client.fetch("Q", durable="pull", max_messages=1)
            assert batch, "every record must come"
            for m in batch:
                await m.ack()
            pulled += batch
        assert [(m.offset, m.payload) for m in pulled] == list(enumerate(payloads))
        async with await client.subscribe("Q", durable="push", start="earliest") as sub:
            for i, payload in enumerate(payloads):
                m = await sub.next(10)
                assert (m.offset, m.payload) == (i, payload)
                await m.ack()
        status = await client.status()
        assert [q["damaged"] for q in status["queues"] if q["name"] == "Q"] == [None]

    # Within the window: start-up reads every record back for the message ids.
    async with running_broker(tmp_path) as broker, connected(broker) as client:
        assert await client.publish("Q", "E", b"again", message_id="m3") == 3  # a duplicate, found
        got = [m for i in range(len(payloads)) for m in await client.fetch("Q", max_messages=1, start=i)]
        assert [m.payload for m in got] == payloads


#: Record sizes as fractions of the largest a PUBLISH may carry: 0.58 (no
#: two share a BATCH), the largest itself, 0.3 (three share one), and small
#: ones (just their tag) that fill what is left.
FRACTIONS = [0.58, 0.58, 0.58, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.58, 0.0]
MAX_MESSAGES = 10


@pytest.mark.parametrize("max_frame", [Limits().max_frame_size, 20_000])
@pytest.mark.parametrize("durable", [None, "d"])
async def test_a_batch_never_exceeds_the_frame_limit(tmp_path: Path, max_frame: int, durable: str | None) -> None:
    """FETCH answers records near the size limit in BATCHes that each fit the
    frame limit WELCOME announced (the default and a small
    --max-frame-bytes): each holds as many of the next records as fit (up to
    max_messages), at least one, and all come in order; for a durable, its
    redeliveries too. A push subscriber gets them all as well (one DELIVER
    each). The broker used to add a record to a BATCH while the bodies so
    far were under 768 KiB, whatever the limit: three records of 600 KB made
    a 1.2 MB frame, which the client refuses (it then dropped the
    connection, and a durable fetch got the same records again)."""
    limits = Limits(max_frame_size=max_frame, handshake_frame_size=min(8192, max_frame))
    largest = BrokerConfig(limits=limits).max_message_bytes - SEQUENCE_HEADER_ROOM  # the client is a producer
    fill = largest - (len(encode_record("E", 2**62, None, b"." * largest)) - largest)  # a record of `largest`
    payloads = [_payload(i, max(0, int(f * fill) - 6)) for i, f in enumerate(FRACTIONS)]  # 6: the tag
    async with running_broker(tmp_path, limits=limits) as broker:
        async with connected(broker) as client:
            assert await client.publish_many("Q", [("E", p) for p in payloads]) == list(range(len(payloads)))
        peer = await RawPeer.connect(broker)
        peer.decoder = FrameDecoder(max_frame)  # a frame over the limit raises FRAME_TOO_LARGE
        try:
            for deliveries in (1, 2) if durable else (1,):
                batches: list[tuple[Record, ...]] = []
                records: list[Record] = []
                while len(records) < len(payloads):  # a plain read from where the last one ended
                    peer.send_frame(Fetch(1, "Q", durable, (), MAX_MESSAGES, 0, "offset", len(records)))
                    batch = await peer.recv()
                    assert isinstance(batch, Batch) and batch.records
                    assert BATCH_OVERHEAD + sum(map(_cost, batch.records)) <= max_frame
                    batches.append(batch.records)
                    records += batch.records
                    assert durable or batch.next_offset == len(records)
                assert [(r.offset, r.payload, r.deliveries) for r in records] == [
                    (i, p, deliveries) for i, p in enumerate(payloads)
                ]
                for batch_records, after in pairwise(batches):  # none could take one more
                    full = BATCH_OVERHEAD + sum(map(_cost, batch_records)) + _cost(after[0]) > max_frame
                    assert full or len(batch_records) == MAX_MESSAGES
                assert len(batches) < len(payloads)  # not one record each
                if durable:  # all of them again, as redeliveries
                    peer.send_frame(Nack(2, "Q", durable, tuple(range(len(payloads))), 0))
                    assert await peer.recv() == Ok(2)
        finally:
            peer.close()
        async with connected(broker) as client, await client.subscribe("Q", durable="push", start="earliest") as sub:
            for i, payload in enumerate(payloads):
                m = await sub.next(10)
                assert (m.offset, m.payload) == (i, payload)


async def test_the_dead_letter_of_the_largest_record_fits_a_frame(tmp_path: Path) -> None:
    """A dead letter's copy adds the x-dead-* headers (up to 378 bytes with
    names of 128 characters) to a record that may already be the largest
    allowed: the record limit leaves room for them, so the copy is stored
    and delivered in one frame (it came out up to 253 bytes over the limit,
    and the client dropped the connection)."""
    queue, durable = "Q" * 128, "d" * 128
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        largest = broker.config.max_message_bytes  # (a plain session's: no x-producer-seq)
        sub = await c.subscribe(queue, durable=durable, max_deliveries=1, dead_letter="DLQ", prefetch=1)
        payload = b"." * (largest - len(encode_record("E", 2**63, None, b"")) - 3)  # (bin 32: 3 more header bytes)
        assert len(encode_record("E", 2**63, None, payload)) == largest
        peer = await RawPeer.connect(broker)
        peer.send_frame(Publish(1, queue, "E", payload))
        assert await peer.recv() == PubAck(1, 0)
        peer.close()
        await (await sub.next(timeout=5)).nack()
        (dead,) = await c.fetch("DLQ", max_messages=10, wait=5)
        assert dead.payload == payload and dead.headers["x-dead-queue"] == queue
        assert dead.headers["x-dead-durable"] == durable


async def test_records_stored_under_a_larger_frame_limit_still_go_out_after_it_is_lowered(tmp_path: Path) -> None:
    """A broker restarted with a lower frame limit (--max-frame-bytes)
    announces one that covers the longest record it found at start-up, so
    the records stored under the earlier limit reach a push subscriber, a
    durable FETCH and a plain one; new messages are held to the new limit
    (PAYLOAD_TOO_LARGE). Once those records are gone, the new limit alone
    counts. (The broker sent such a record over the limit it
    announced: the client refused the frame and dropped the connection, then
    got the same record again on reconnecting, for ever.)"""

    def limits(size: int) -> Limits:
        return Limits(max_frame_size=size, handshake_frame_size=min(8192, size))

    big = b"x" * 60_000
    async with running_broker(tmp_path, limits=limits(65536)) as broker, connected(broker) as client:
        assert await client.publish_many("Q", [("E", big), ("E", b"small")]) == [0, 1]
    async with running_broker(tmp_path, limits=limits(16384)) as broker, connected(broker) as client:
        assert 60_000 + RECORD_ROOM < broker.limits.max_frame_size < 65536  # what the longest record needs
        async with await client.subscribe("Q", durable="push", start="earliest") as sub:
            for offset, payload in enumerate((big, b"small")):
                m = await sub.next(10)
                assert (m.offset, m.payload) == (offset, payload)
                await m.ack()
        assert [m.payload for m in await client.fetch("Q", durable="pull", max_messages=5)] == [big, b"small"]
        assert [m.payload for m in await client.fetch("Q", max_messages=5, start=0)] == [big, b"small"]
        with pytest.raises(ServerError) as info:
            await client.publish("Q", "E", b"y" * 20_000)
        assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
        assert await client.publish("Q", "E", b"y" * 15_000) == 2
        assert client.reconnects == 0
    async with running_broker(tmp_path, limits=limits(16384)) as broker, connected(broker) as client:
        await client.delete_queue("Q")
    async with running_broker(tmp_path, limits=limits(16384)) as broker:
        assert broker.limits.max_frame_size == 16384  # no record left: the new limit alone
    async with running_broker(tmp_path, limits=limits(32768)) as broker:
        assert broker.limits.max_frame_size == 32768
