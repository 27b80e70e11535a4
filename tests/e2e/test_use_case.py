"""The seed's use case, end to end: an API publishes DB/CREATE; a logger, a
dashboard and a monitor subscribe durably; the dashboard drops out and
catches up; a poller FETCHes; STATUS shows everyone."""

from __future__ import annotations

from pathlib import Path

from client import Client
from tests.helpers import connected, running_broker, url_of


async def _take(sub, n):  # type: ignore[no-untyped-def]
    got = []
    async for msg in sub:
        got.append(msg)
        await msg.ack()
        if len(got) == n:
            break
    return got


async def test_seed_use_case(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        url = url_of(broker)
        logger_c = await Client.open(url, name="logger")
        dash_c = await Client.open(url, name="dashboard")
        monitor_c = await Client.open(url, name="monitor")
        subs = {
            "logger": await logger_c.subscribe("DB", events=["CREATE"], durable="logger", start="earliest"),
            "dashboard": await dash_c.subscribe("DB", events=["CREATE"], durable="dashboard", start="earliest"),
            "monitor": await monitor_c.subscribe("DB", events=["CREATE"], durable="monitor", start="earliest"),
        }
        async with connected(broker, "api") as api:
            first = [await api.publish("DB", "CREATE", {"id": i}) for i in range(10)]
            await api.publish("DB", "DELETE", {"id": 0})  # filtered out for everyone
            assert first == list(range(10))

            for name, sub in subs.items():
                got = await _take(sub, 10)
                assert [m.payload["id"] for m in got] == list(range(10)), name
                assert all(m.event == "CREATE" and m.queue == "DB" and not m.redelivered for m in got)

            # STATUS: every client, its queue and its events.
            info = await api.status()
            names = {c["name"]: c for c in info["connections"]}
            assert {"api", "logger", "dashboard", "monitor"} <= set(names)
            sub_info = names["dashboard"]["subscriptions"][0]
            assert (sub_info["queue"], sub_info["events"], sub_info["durable"]) == ("DB", ["CREATE"], "dashboard")
            assert [q["name"] for q in info["queues"]] == ["DB"]
            assert {d["name"] for d in info["durables"]} == {"logger", "dashboard", "monitor"}

            # The dashboard goes dark; more records arrive meanwhile.
            await dash_c.aclose()
            more = [await api.publish("DB", "CREATE", {"id": i}) for i in range(10, 20)]
            assert more == list(range(11, 21))
            for name in ("logger", "monitor"):
                got = await _take(subs[name], 10)
                assert [m.payload["id"] for m in got] == list(range(10, 20))

            # It reconnects and catches up on exactly what it missed, in order.
            async with connected(broker, "dashboard") as dash2:
                sub = await dash2.subscribe("DB", events=["CREATE"], durable="dashboard")
                got = await _take(sub, 10)
                assert [m.payload["id"] for m in got] == list(range(10, 20))
                assert [m.offset for m in got] == more
                await sub.close()

            # A poller gets the same records with FETCH.
            async with connected(broker, "poller") as poller:
                seen = []
                while len(seen) < 20:
                    batch = await poller.fetch("DB", durable="poller", events=["CREATE"], max_messages=7, wait=1.0)
                    assert batch
                    for msg in batch:
                        await msg.ack()
                    seen += [m.payload["id"] for m in batch]
                assert seen == list(range(20))
                assert await poller.fetch("DB", durable="poller", max_messages=5) == []
        for c in (logger_c, monitor_c):
            await c.aclose()
