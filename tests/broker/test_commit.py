"""Group commit under ``--fsync always``: small rounds are synced on the loop
when the committer is idle; bigger ones, and rounds that arrive while one is
in flight, go to the committer thread. Either way a publish is confirmed only
after the fsync that covers it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from broker.store import INLINE_MAX_RECORDS, Store
from tests.helpers import connected, running_broker


def spy_rounds(store: Store) -> dict[str, int]:
    """Count commit rounds per path: ``inline`` on the loop, ``committer`` via the thread."""
    counts = {"inline": 0, "committer": 0}
    inline, synced = store._commit_inline, store._synced

    def counting_inline(queue: Any) -> bool:
        done = inline(queue)
        counts["inline"] += done
        return done

    def counting_synced(batch: Any, always: bool) -> None:
        counts["committer"] += 1
        synced(batch, always)

    store._commit_inline = counting_inline  # type: ignore[method-assign]
    store._synced = counting_synced  # type: ignore[method-assign]
    return counts


async def test_a_lone_publish_is_synced_on_the_loop(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        counts = spy_rounds(broker.store)
        fsyncs = broker.store.fsyncs
        for i in range(5):
            assert await c.publish("Q", "E", i) == i
        assert counts == {"inline": 5, "committer": 0}
        assert broker.store.fsyncs == fsyncs + 5


async def test_a_big_round_goes_to_the_committer(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        counts = spy_rounds(broker.store)
        n = INLINE_MAX_RECORDS + 1
        assert await c.publish_many("Q", [("E", i) for i in range(n)]) == list(range(n))
        assert counts["inline"] == 0 and counts["committer"] >= 1


async def test_a_small_round_during_a_round_in_flight_waits_for_the_committer(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        store = broker.store
        counts = spy_rounds(store)
        assert store._round_lock.acquire(blocking=False)  # stands for a committer round in flight
        try:
            publish = asyncio.ensure_future(c.publish("Q", "E", "x"))
            await c.ping()  # the broker has read (and appended) the publish: its kick ran
            queue = store.get("Q", create=False)
            assert queue is not None and queue.log.next_offset == 1 and queue.committed == 0
            assert not publish.done() and counts == {"inline": 0, "committer": 0}
        finally:
            store._round_lock.release()  # the committer takes the queue in its next round
        assert await publish == 0
        assert counts == {"inline": 0, "committer": 1}


async def test_store_counts_the_connections_awaiting_confirms(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker, "a") as a, connected(broker, "b") as b:
        store = broker.store
        assert store._round_lock.acquire(blocking=False)  # nothing commits meanwhile
        try:
            first = asyncio.ensure_future(a.publish("Q", "E", 1))
            second = asyncio.ensure_future(b.publish("Q", "E", 2))
            await a.ping()
            await b.ping()  # both publishes are read and appended, neither confirmed
            assert store.publishers == 2
        finally:
            store._round_lock.release()
        assert sorted([await first, await second]) == [0, 1]
        assert store.publishers == 0


async def test_a_small_round_while_another_connection_awaits_confirms_goes_to_the_committer(tmp_path: Path) -> None:
    """Several publishers: the loop keeps reading while the committer syncs."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        store = broker.store
        counts = spy_rounds(store)
        store.publishers += 1  # another connection is waiting for its confirms
        try:
            assert await c.publish("Q", "E", "x") == 0
        finally:
            store.publishers -= 1
        assert counts == {"inline": 0, "committer": 1}
        # The committer queues the confirm while it holds the round lock and
        # lets go of it just after; the confirm can reach us, and our next
        # publish the broker, before that thread runs again (the GIL). Wait
        # for it here, or the publish finds a round in flight and joins it.
        with store._round_lock:
            pass
        assert await c.publish("Q", "E", "y") == 1  # alone again: on the loop
        assert counts == {"inline": 1, "committer": 1}
