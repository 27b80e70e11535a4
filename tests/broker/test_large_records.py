"""Records near the frame limit, end to end: stored, read back from disk, fetched.

A PUBLISH may carry a record up to the frame limit (1 MiB by default), four
times the log's read chunk (256 KiB), so such records are read back from
disk in more than one piece. After a restart nothing is in memory: every
read goes to the log.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import connected, running_broker

#: Payload sizes: around and above a read chunk (256 KiB), small ones
#: between them, and close to the largest a PUBLISH may carry under the 1 MiB
#: frame limit (the record body is the payload plus ~40 bytes).
SIZES = [300_000, 20, 900_000, 1_048_000, 20, 300_000]


def _payload(i: int, size: int) -> bytes:
    return b"<%04d>" % i + b"." * size


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
