"""A record damaged after start-up (bit rot under a running broker).

Start-up checks every record; damage that appears later is met when a record
is read back from disk. The broker must neither send it, nor skip it on its
own, nor fall over: readers stop before it, FETCH says QUEUE_CORRUPT, STATUS
names it, everything else carries on, and SEEK moves a durable past it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client import Client
from protocol import ErrorCode, ServerError
from tests.helpers import assert_broker_healthy, connected, running_broker

# Bigger than the in-memory tail (8 MiB): the first records are read from disk.
COUNT = 100
SIZE = 100_000
DAMAGED = 5


def _payload(i: int) -> bytes:
    return b"<%04d>" % i + b"." * SIZE


def _rot(data_dir: Path, queue: str, i: int) -> None:
    """Flip one byte inside the payload of message ``i`` on disk."""
    path = data_dir / "queues" / queue / f"{0:020d}.log"
    with open(path, "r+b") as f:
        content = f.read()
        at = content.index(b"<%04d>" % i) + 100
        f.seek(at)
        f.write(bytes([content[at] ^ 0xFF]))


async def _fill(client: Client, queue: str) -> None:
    for first in range(0, COUNT, 10):
        await client.publish_many(queue, [("E", _payload(i)) for i in range(first, first + 10)])


async def test_fetch_stops_before_a_damaged_record_and_then_says_queue_corrupt(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as client:
            await _pull_up_to_the_damage(tmp_path, client)
        async with connected(broker) as client:  # the puller above held the durable until it left
            await client.seek("Q", "d", DAMAGED + 1)
            rest = await client.fetch("Q", durable="d", max_messages=3)
            assert [m.offset for m in rest] == [DAMAGED + 1, DAMAGED + 2, DAMAGED + 3]
        await assert_broker_healthy(broker)


async def _pull_up_to_the_damage(tmp_path: Path, client: Client) -> None:
    """Fill Q, damage record 5, FETCH up to it, and check what the broker says there."""
    await _fill(client, "Q")
    await client.publish("OTHER", "E", b"fine")
    _rot(tmp_path, "Q", DAMAGED)
    got: list[int] = []
    while len(got) < DAMAGED:
        batch = await client.fetch("Q", durable="d", max_messages=3)
        assert batch, "the records before the damage must still come"
        got += [m.offset for m in batch]
        for m in batch:
            await m.ack()
    assert got == list(range(DAMAGED))
    with pytest.raises(ServerError) as err:
        await client.fetch("Q", durable="d", max_messages=3)
    assert err.value.code == ErrorCode.QUEUE_CORRUPT
    assert f"record {DAMAGED}" in str(err.value)
    # Clients learn the file, not where the broker keeps its data.
    assert f"Q/{0:020d}.log: corrupt record at byte" in str(err.value)
    assert str(tmp_path) not in str(err.value)
    with pytest.raises(ServerError) as err:  # a plain read stops at the same place
        await client.fetch("Q", max_messages=100, start=DAMAGED)
    assert err.value.code == ErrorCode.QUEUE_CORRUPT
    plain = await client.fetch("Q", max_messages=100, start=0)
    assert [m.offset for m in plain] == list(range(DAMAGED))

    status = await client.status()
    queues = {q["name"]: q for q in status["queues"]}
    assert queues["Q"]["damaged"]["offset"] == DAMAGED
    assert str(tmp_path) not in queues["Q"]["damaged"]["error"]
    assert queues["OTHER"]["damaged"] is None
    assert [m.payload for m in await client.fetch("OTHER", max_messages=1)] == [b"fine"]
    await client.publish("Q", "E", b"later")  # publishing goes on


async def test_a_push_subscriber_gets_nothing_past_a_damaged_record(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as client:
            await _fill(client, "Q")
            _rot(tmp_path, "Q", DAMAGED)
            sub = await client.subscribe("Q", durable="d", start="earliest", prefetch=1000)
            for i in range(DAMAGED):
                m = await sub.next(10)
                assert (m.offset, m.payload[:6]) == (i, b"<%04d>" % i)
                await m.ack()
            # A publish on this connection is confirmed in the same broker step that pumps
            # the durable, and a PING answered after it: any DELIVER sent would be here by now.
            await client.publish("Q", "E", b"later")
            await client.ping()
            assert sub.pending == 0
            status = await client.status()
            assert [q["damaged"]["offset"] for q in status["queues"] if q["name"] == "Q"] == [DAMAGED]
            await sub.close()
            await client.seek("Q", "d", DAMAGED + 1)
            sub = await client.subscribe("Q", durable="d")
            m = await sub.next(10)
            assert m.offset == DAMAGED + 1
        await assert_broker_healthy(broker)


async def test_a_queue_refused_at_start_up_can_be_deleted_and_used_anew(tmp_path: Path) -> None:
    """A queue whose damage refuses it at start-up (QUEUE_CORRUPT) is given
    up on with DELETE, without stopping the broker: its files go, and the
    name is a new, empty queue from then on (it answered NOT_FOUND)."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await _fill(c, "Q")
        await c.publish("keep", "E", 1)
    _rot(tmp_path, "Q", DAMAGED)
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert "Q" in broker.store.failed
        with pytest.raises(ServerError) as info:
            await c.publish("Q", "E", 1)
        assert info.value.code == ErrorCode.QUEUE_CORRUPT
        assert f"Q/{0:020d}.log: corrupt record at byte" in str(info.value)
        assert str(tmp_path) not in str(info.value)
        assert all(str(tmp_path) not in q.get("error", "") for q in (await c.status())["queues"])
        await c.delete_queue("Q")
        assert not (tmp_path / "queues" / "Q").exists() and not broker.store.failed
        assert await c.publish("Q", "E", "new") == 0
        assert [m.offset for m in await c.fetch("keep")] == [0]
        await assert_broker_healthy(broker, baseline=1)
