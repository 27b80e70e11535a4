"""Leak soak (RELIABILITY.md F6): odd-but-valid sequences, many times over,
leave nothing behind.

One cycle, on an in-process broker with a real client and a raw connection:
an ephemeral subscription made and closed; a durable push subscription that
takes a message, NACKs it, takes the redelivery and ACKs it ten times over
(an ack storm), then closes with messages still in flight; a PUBLISH whose
message id was seen before (a duplicate: nothing stored); an ACK of an
offset the durable never got (BAD_ACK); a long-poll FETCH that times out;
a SEEK back and a FETCH that acks what it gets; a durable made and deleted;
STATUS; and a connection that says HELLO, PING and BYE.

After a warm-up, the census of the process's Python objects by type is
taken, and again after the measured cycles; the resident memory is sampled
twelve times along the way.
Pass: no type has grown by more than a few objects however many cycles ran
(a leak of one object per cycle shows as thousands), the resident memory
steady (the lowest of the last third of the run within 5 MiB of the lowest
of the first: the allocator's steps of about 2 MB come and go, a leak
stays), and the broker's tables (sessions, subscriptions, fetch
waiters, in flight, dedup, producers) and the client's (pending requests,
subscriptions, request-timeout marks) back to their size after the warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from broker import Broker
from client import Client
from protocol import BadRequest, Bye, ErrorCode, Ping, Pong
from tests.conftest import TEST_TIMEOUT
from tests.helpers import RawPeer, running_broker, url_of

SOAK = bool(os.environ.get("TIDINGS_SOAK"))
CYCLES = 100_000 if SOAK else 2_000
#: The allocator settles within a few thousand cycles.
WARM_UP = max(300, CYCLES // 20)
#: A type may grow by this many objects (what is in flight at one moment
#: differs a little between two quiet points); a per-cycle leak grows by CYCLES.
SLACK = 50
MIB = 1024 * 1024
M_ARENA_MAX = -8  # mallopt(3)
IDS = [f"id-{i}" for i in range(10)]


def census() -> Counter[str]:
    """Live objects the garbage collector tracks, by type."""
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tables(broker: Broker, client: Client) -> dict[str, int]:
    """The sizes of the broker's and the client's tables that a leak would grow."""
    queues = broker.store.queues.values()
    return {
        "client: pending": len(client._pending),
        "client: request kinds": len(client._kinds),
        "client: frames kept for resending": len(client._frames),
        "client: subscriptions": len(client._subs),
        "client: ack requests": len(client._ack_reqs),
        "sessions": len(broker.sessions),
        "subscriptions": sum(len(s.subs) for s in broker.sessions),
        "ephemeral groups": sum(len(q.ephemeral) for q in queues),
        "durables": sum(len(q.groups) for q in queues),
        "consumers": sum(len(g.consumers) for q in queues for g in q.groups.values()),
        "fetch waiters": sum(len(q.waiters) for q in queues),
        "in flight": sum(len(g.deliveries) for q in queues for g in q.groups.values()),
        "dedup ids": sum(len(q._dedup) for q in queues),
        "producers": sum(len(q.producers) for q in queues),
        "queues": len(broker.store.queues),
        "auth failures": len(broker.auth_failures),
    }


async def cycle(broker: Broker, c: Client, i: int) -> None:
    sub = await c.subscribe("Q", events=["E*"])
    await sub.close()

    sub = await c.subscribe("Q", durable=f"d{i % 3}", start="earliest", prefetch=5, ack_wait=60)
    msg = await sub.next(timeout=5)
    await msg.nack()
    again = await sub.next(timeout=5)
    while again.offset != msg.offset:  # the redelivery comes first, unless others were in flight
        again = await sub.next(timeout=5)
    for _ in range(10):
        await again.ack()
    await sub.close()  # the other messages in flight go back
    await c.seek("Q", f"d{i % 3}", "earliest")  # (so that it always has messages)

    assert await c.publish("Q", "E", i, message_id=IDS[i % len(IDS)]) == IDS.index(IDS[i % len(IDS)])

    with pytest.raises(BadRequest) as info:
        await c.ack_upto("Q", "puller", 10_000)
    assert info.value.code == ErrorCode.BAD_ACK
    await c.seek("Q", "puller", "new")
    assert await c.fetch("Q", durable="puller", max_messages=5, wait=0.001) == []
    await c.seek("Q", "puller", "earliest")
    for m in await c.fetch("Q", durable="puller", max_messages=5):
        await m.ack()

    tmp = await c.subscribe("Q", durable="tmp", start="earliest", prefetch=1)
    await tmp.close()
    await c.delete_durable("Q", "tmp")

    await c.status()

    peer = await RawPeer.connect(broker)
    peer.send_frame(Ping(2))
    assert await peer.recv() == Pong(2)
    peer.send_frame(Bye(3))
    await peer.expect_closed()
    peer.close()


@contextlib.contextmanager
def one_malloc_arena() -> Iterator[None]:
    """glibc's malloc gives each thread that allocates its own arena, and
    memory freed across threads (the broker's fsync and cursor threads)
    fragments them: over 100,000 cycles RSS crept up 6-7 MB with no object
    or table growing, and not at all with MALLOC_ARENA_MAX=1. So the threads
    made during the measurement share one arena (M_ARENA_MAX; reset after):
    what RSS still shows is memory held, not scattered."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        yield
        return
    libc.mallopt(M_ARENA_MAX, 1)
    try:
        yield
    finally:
        libc.mallopt(M_ARENA_MAX, 0)  # 0: glibc's default


def test_odd_but_valid_sequences_leave_nothing_behind(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            running_broker(tmp_path, dedup_window=3600) as broker,  # (the ids stay known through T2's minutes)
            Client(url_of(broker), name="leaks", reconnect=False) as c,
        ):
            for i, mid in enumerate(IDS):  # the messages every cycle reads, under ids cycles resend
                assert await c.publish("Q", "E", i, message_id=mid) == i
            for m in await c.fetch("Q", durable="puller", max_messages=1):  # (made here)
                await m.ack()
            for i in range(WARM_UP):
                await cycle(broker, c, i)
            before, tables_before = census(), tables(broker, c)
            samples = []  # RSS, 12 times over the cycles
            for i in range(CYCLES):
                await cycle(broker, c, WARM_UP + i)
                if i % (CYCLES // 12) == 0 or i == CYCLES - 1:
                    samples.append(rss())
            after, tables_after = census(), tables(broker, c)
            marks = len(c._marks)
        grown = {kind: n for kind, n in (after - before).items() if n > SLACK}
        assert not grown, f"grew over {CYCLES} cycles: {grown}"
        # The lowest RSS of the last third against that of the first: the
        # allocator's 2 MB steps come and go, a leak stays.
        third = len(samples) // 3
        assert min(samples[-third:]) - min(samples[:third]) < 5 * MIB, [n // 1024 for n in samples]
        assert tables_after == tables_before
        # The client's request-timeout marks: at most one per sixteenth of its
        # timeout, for a timeout and a sweep (one per write held 70,000: 8 MB).
        assert marks <= 16 + 4 + 2, marks

    quiet = [logging.getLogger(name) for name in ("broker", "client")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # (captured log records would be the growth)
        logger.setLevel(logging.WARNING)
    try:
        with one_malloc_arena():
            uvloop.run(asyncio.wait_for(main(), TEST_TIMEOUT))
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
