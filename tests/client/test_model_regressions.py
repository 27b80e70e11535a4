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
