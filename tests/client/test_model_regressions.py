"""Regressions found by the client model (``test_client_model.py``), each
reduced to the few steps that showed it."""

from __future__ import annotations

from pathlib import Path

from client import Client
from tests.helpers import connected, running_broker, url_of


async def test_a_dropped_connection_does_not_hand_messages_to_itself(tmp_path: Path) -> None:
    """A connection with two consumers of one durable dropped: detaching the
    first pumped what it held to the second, on the same dead connection, so
    the message came back with deliveries 3 instead of 2; with
    max_deliveries=2, a message delivered once went to the dead-letter queue."""
    async with running_broker(tmp_path) as broker, connected(broker, "pub") as pub:
        c = await Client.open(url_of(broker), name="doomed", reconnect=False)
        holder = await c.subscribe("Q", durable="d", start="earliest", prefetch=1, max_deliveries=2)
        await pub.publish("Q", "E", "once")
        assert (await holder.next(timeout=5)).deliveries == 1
        await c.subscribe("Q", durable="d", prefetch=5)  # credit to spare, holds nothing
        c.abort()
        async with connected(broker, "next") as c2:
            sub = await c2.subscribe("Q", durable="d", prefetch=5)
            m = await sub.next(timeout=5)
            assert (m.offset, m.deliveries) == (0, 2)


async def test_shutdown_does_not_read_the_closed_logs(tmp_path: Path) -> None:
    """At shutdown the store closed the logs before the sessions went; a session
    detaching a subscription pumped another consumer, read a closed file
    (EBADF inside connection_lost, so the session was never unregistered and
    aclose waited out the whole grace period)."""
    async with running_broker(tmp_path) as broker, connected(broker, "pub") as pub:
        await pub.publish("Q", "E", "on disk")
    async with running_broker(tmp_path) as broker:  # the record is read from disk, not the tail
        a = await Client.open(url_of(broker), name="a", reconnect=False)
        b = await Client.open(url_of(broker), name="b", reconnect=False)
        try:
            # Crosswise, so whichever connection closes first gives back a message
            # that a consumer on the other one has credit for.
            for holder, spare, durable in ((a, b, "x"), (b, a, "y")):
                sub = await holder.subscribe("Q", durable=durable, start="earliest", prefetch=1)
                assert (await sub.next(timeout=5)).offset == 0
                await spare.subscribe("Q", durable=durable, prefetch=5)
            await broker.aclose()
            assert not broker.sessions
        finally:
            a.abort()
            b.abort()


async def test_an_ack_reaches_the_broker_before_any_later_request(tmp_path: Path) -> None:
    """``await msg.ack()`` queues the ack for the end of the loop turn; a request
    made right after it (a PING, STATUS, FETCH...) was written first, so the
    broker answered it as if the ack had not happened yet."""
    async with running_broker(tmp_path) as broker, connected(broker, "c") as c:
        await c.publish("Q", "E", 0)
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=1)
        await (await sub.next(timeout=5)).ack()
        (durable,) = (await c.status())["durables"]
        assert (durable["ack_floor"], durable["lag"]) == (1, 0)


async def test_two_restarts_remember_what_was_delivered_before_the_first(tmp_path: Path) -> None:
    """Offset 1, delivered before a restart and not handed out again before a
    second one, comes back with deliveries 1 (no redelivered flag); the model
    also saw an ack of such an offset refused as "never delivered"."""
    async with running_broker(tmp_path) as broker, connected(broker, "c") as c:
        await c.publish_many("Q", [("E", 0), ("E", 1)])
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=2)
        for _ in range(2):
            await sub.next(timeout=5)
        await sub.close()
    async with running_broker(tmp_path) as broker, connected(broker, "c") as c:
        sub = await c.subscribe("Q", durable="d", prefetch=1)  # only offset 0 is handed out again
        m = await sub.next(timeout=5)
        assert (m.offset, m.deliveries) == (0, 2)
        await sub.close()
        await m.ack(wait=True)  # after the close, so that offset 1 is not handed out
    async with running_broker(tmp_path) as broker, connected(broker, "c") as c:
        sub = await c.subscribe("Q", durable="d", prefetch=1)
        m = await sub.next(timeout=5)
        assert (m.offset, m.deliveries) == (1, 2)
