"""Subscriber churn (R3, R4): a durable subscriber that keeps dropping its
connection mid-stream still gets everything at least once, its first
deliveries in log order, and at most ``prefetch`` duplicates per reconnect."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
from pathlib import Path
from typing import Any

import pytest

from client import Client
from tests.helpers import TlsFiles, running_broker, url_of

SOAK = bool(os.environ.get("TIDINGS_SOAK"))


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_reconnecting_subscriber_misses_nothing(tmp_path: Path, transport: str, tls_files: TlsFiles) -> None:
    """RELIABILITY.md E1, and over TLS too in the soak tier (A5)."""
    if transport == "tls" and not SOAK:
        pytest.skip("over TLS in the soak tier (make soak)")
    total, reconnects = (100_000, 1000) if SOAK else (20_000, 200)
    prefetch = 32
    rng = random.Random(7)
    tls: dict[str, Any] = {"tls_cert": tls_files.cert, "tls_key": tls_files.key} if transport == "tls" else {}
    options = {"ssl_context": ssl.create_default_context(cafile=tls_files.ca)} if tls else {}
    async with running_broker(tmp_path, **tls) as broker:
        url = url_of(broker)

        async def publisher() -> None:
            async with Client(url, name="pub", **options) as c:
                for start in range(0, total, 200):
                    await c.publish_many("Q", [("E", i) for i in range(start, start + 200)])

        pub = asyncio.ensure_future(publisher())
        seen: dict[int, int] = {}  # offset -> times delivered
        first_order: list[int] = []
        sessions = 0
        duplicates_per_session: list[int] = []
        while len(seen) < total:
            sessions += 1
            c = await Client.open(url, name=f"sub{sessions}", **options)
            sub = await c.subscribe("Q", durable="churn", start="earliest", prefetch=prefetch)
            budget = rng.randint(1, 2 * total // reconnects)
            dups = 0
            for i in range(budget):
                try:
                    msg = await sub.next(timeout=10)
                except TimeoutError:
                    g = broker.store.queues["Q"].groups["churn"]
                    raise AssertionError(
                        f"stalled: seen={len(seen)} {g!r} ready={sorted(g.ready)[:5]} delayed={len(g.delayed)} "
                        f"consumers={g.consumers} committed={broker.store.queues['Q'].committed}"
                    ) from None
                if msg.offset in seen:
                    dups += 1
                else:
                    first_order.append(msg.offset)
                seen[msg.offset] = seen.get(msg.offset, 0) + 1
                assert msg.payload == msg.offset
                if i < budget - 5:  # the last few stay unacked, as if the process died mid-work
                    await msg.ack()
                if len(seen) == total:
                    break
            duplicates_per_session.append(dups)
            c.abort()  # no goodbye: a dropped connection
        await pub
        assert sorted(seen) == list(range(total))
        assert first_order == sorted(first_order), "first deliveries out of log order"
        assert sessions >= reconnects // 2
        # Redelivered after a drop: at most what the dropped session held unacked.
        assert max(duplicates_per_session) <= prefetch
