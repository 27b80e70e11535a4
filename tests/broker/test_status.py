"""STATUS larger than a frame: pages that each fit, joined by the client.

Before paging, a STATUS reply over the frame limit raised inside the
session's ``data_received``: the asker's connection died with a traceback in
the log, and its client, resending the STATUS after reconnecting, died again
(with the default 1 MiB frame, from about 7,000 connections on).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from broker.status import status_page
from client import Client
from protocol import STATUS_SECTIONS, BadRequest, Err, ErrorCode, FrameType, Limits, Ping, Pong, StatusReply
from protocol.framing import pack_body
from tests.helpers import RawPeer, assert_broker_healthy, connected, running_broker, url_of

SMALL = Limits(max_frame_size=4096, handshake_frame_size=4096)
#: Keys whose values move between two STATUS calls made a moment apart.
VOLATILE = {"uptime", "publish_rate", "since"}


def _steady(value: Any) -> Any:
    """``value`` without the keys that change from one call to the next."""
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


async def _populate(broker: Any, stack: contextlib.AsyncExitStack, clients: int) -> list[Client]:
    """``clients`` connections with long names; queues with durables and subscriptions."""
    conns = [await stack.enter_async_context(connected(broker, f"client-{i:03d}-" + "n" * 60)) for i in range(clients)]
    for q in range(12):
        await conns[q].publish(f"queue-{q:02d}", "E", q)
        for d in range(3):
            await conns[q].subscribe(f"queue-{q:02d}", durable=f"durable-{d}", events=["E", "F*"])
    return conns


def _pages(broker: Any, max_bytes: int) -> list[dict[str, Any]]:
    pages, more = [], None
    while True:
        page = status_page(broker, more, max_bytes)
        assert len(pack_body([int(FrameType.STATUS_REPLY), 2**64 - 1, page])) <= max_bytes
        pages.append(page)
        more = page.pop("more", None)
        if more is None:
            return pages


async def test_pages_at_any_frame_size_join_to_the_whole_status(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, contextlib.AsyncExitStack() as stack:
        await _populate(broker, stack, 40)
        whole = status_page(broker, None, Limits().max_frame_size)
        assert "more" not in whole and len(whole["connections"]) == 40 and len(whole["durables"]) == 36
        for max_bytes in (1500, 2048, 4096, 9000, 30_000):
            pages = _pages(broker, max_bytes)
            assert len(pages) > 1 or max_bytes == 30_000
            joined = {s: [e for p in pages for e in p[s]] for s in STATUS_SECTIONS}
            assert _steady(joined) == _steady({s: whole[s] for s in STATUS_SECTIONS}), max_bytes


async def test_the_client_joins_the_pages_of_a_status_larger_than_a_frame(tmp_path: Path) -> None:
    async with running_broker(tmp_path, limits=SMALL) as broker, contextlib.AsyncExitStack() as stack:
        conns = await _populate(broker, stack, 40)
        info = await conns[0].status()
        assert [c["id"] for c in info["connections"]] == sorted(c.conn_id for c in conns)
        assert [q["name"] for q in info["queues"]] == [f"queue-{q:02d}" for q in range(12)]
        assert [(d["queue"], d["name"]) for d in info["durables"]] == [
            (f"queue-{q:02d}", f"durable-{d}") for q in range(12) for d in range(3)
        ]
        assert "more" not in info and info["server"]["conn_count"] == 40
        # Each frame on the wire fits: the raw replies, page by page.
        peer = await RawPeer.connect(broker)
        req, more, frames = 10, None, 0
        while True:
            peer.send_wire([int(FrameType.STATUS), req] + ([] if more is None else [more]))
            reply = await peer.recv()
            assert isinstance(reply, StatusReply) and reply.req == req
            assert len(pack_body(reply.to_wire())) <= SMALL.max_frame_size
            frames, req, more = frames + 1, req + 1, reply.info.get("more")
            if more is None:
                break
        assert frames >= 3
        peer.close()
        await assert_broker_healthy(broker, baseline=40)


async def test_a_page_resumes_after_its_key_when_connections_come_and_go(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, contextlib.AsyncExitStack() as stack:
        conns = await _populate(broker, stack, 30)
        first = status_page(broker, None, 2048)
        more = first["more"]
        assert more["section"] == "connections"
        seen = [c["id"] for c in first["connections"]]
        gone_seen, gone_unseen = conns[0], conns[-1]  # one already on the first page, one not yet
        await gone_seen.aclose()
        await gone_unseen.aclose()
        late = await stack.enter_async_context(connected(broker, "late"))
        rest: list[int] = []
        while more is not None:
            page = status_page(broker, more, 2048)
            rest += [c["id"] for c in page["connections"]]
            more = page.get("more")
        assert not set(seen) & set(rest)
        assert gone_unseen.conn_id not in rest and late.conn_id in rest
        assert seen + rest == sorted(seen + rest)


async def test_an_entry_too_large_for_any_page_comes_without_its_lists(tmp_path: Path) -> None:
    async with running_broker(tmp_path, limits=SMALL) as broker, connected(broker, "many") as c:
        for i in range(80):
            await c.subscribe(f"queue-with-a-long-name-{i:03d}", events=["CREATE", "UPDATE"])
        info = await c.status()
        (conn,) = info["connections"]
        assert conn["subscriptions"] == [] and conn["omitted"] == {"subscriptions": 80}
        assert len(info["queues"]) == 80


async def test_a_bad_page_is_bad_request_and_the_connection_stays(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        peer = await RawPeer.connect(broker)
        bad_pages = [
            {"section": "nope", "after": None},
            {"section": "connections", "after": "x"},
            {"section": "durables", "after": ["only-one"]},
            {"section": "queues", "after": None, "extra": 1},
            {},
        ]
        for req, page in enumerate(bad_pages, start=2):
            peer.send_wire([int(FrameType.STATUS), req, page])
            reply = await peer.recv()
            assert isinstance(reply, Err) and reply.req == req and reply.code == ErrorCode.BAD_REQUEST, reply
            assert "page" in reply.message
        peer.send_wire([int(FrameType.STATUS), 20, "not a map"])  # wrong type: a protocol violation
        reply = await peer.recv()
        assert isinstance(reply, Err) and reply.code == ErrorCode.MALFORMED_FRAME
        peer.close()
        peer = await RawPeer.connect(broker)
        peer.send_frame(Ping(3))
        assert await peer.recv() == Pong(3)
        peer.close()


async def test_a_frame_limit_too_small_for_one_entry_is_a_clear_error(tmp_path: Path) -> None:
    tiny = Limits(max_frame_size=300, handshake_frame_size=300)
    async with running_broker(tmp_path, limits=tiny) as broker, Client(url_of(broker), name="x" * 200) as c:
        with pytest.raises(BadRequest, match="does not fit in a frame"):
            await c.status()
        assert await c.ping() > 0  # the connection is still up


async def test_a_durables_fetchers_are_counted_beside_its_consumers(tmp_path: Path) -> None:
    """A connection holding a fetched message unacked makes SEEK and DELETE
    of the durable a CONFLICT; STATUS counts it, under ``fetchers`` (its
    ``consumers`` are push subscriptions, as before). It showed no one."""
    async with running_broker(tmp_path) as broker, connected(broker, "worker") as worker, connected(broker) as admin:
        await worker.publish_many("hq", [("e", i) for i in range(3)])
        (held,) = await worker.fetch("hq", durable="hd", start="earliest", max_messages=1)

        async def counts() -> tuple[int, int, int]:
            (durable,) = (await admin.status())["durables"]
            return durable["consumers"], durable["fetchers"], durable["in_flight"]

        assert await counts() == (0, 1, 1)
        sub = await admin.subscribe("hq", durable="hd")
        assert (await sub.next(timeout=5)).offset == 1
        assert await counts() == (1, 1, 3)  # (prefetch: the subscription took both others)
        await held.ack(wait=True)
        assert await counts() == (1, 0, 2)  # still attached, but holding nothing
        await sub.close()
        assert await counts() == (0, 0, 0)
