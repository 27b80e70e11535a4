"""Client.publish's fast path: the same errors, nothing left pending, a resendable frame."""

from __future__ import annotations

import asyncio
import re
import weakref
from pathlib import Path
from typing import Any

import pytest

from protocol import BadRequest, Err, ErrorCode, FrameType, LocalProtocolError, PubAck, Publish
from protocol.errors import LocalInvalidName
from tests.helpers import RawPeer, connected, running_broker

BAD: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("bad queue", ("bad/q", "e", 1), {}, "PUBLISH: invalid queue name 'bad/q'"),
    ("bad event", ("q", "bad event", 1), {}, "PUBLISH: invalid event name 'bad event'"),
    ("unhashable queue", (["q"], "e", 1), {}, "PUBLISH: name must be a string, not list"),
    ("int event", ("q", 5, 1), {}, "PUBLISH: name must be a string, not int"),
    ("unencodable", ("q", "e", object()), {}, "PUBLISH frame cannot be encoded as msgpack"),
    ("bad headers", ("q", "e", 1), {"headers": {"a": 1}}, "PUBLISH: headers must map strings to strings"),
    ("bad id", ("q", "e", 1), {"message_id": 5}, "PUBLISH: message_id must be a string or nil, not int"),
    (
        "int map key",
        ("q", "e", {"http": {200: "ok"}}),
        {},
        "PUBLISH frame cannot be sent: map keys must be strings (or bytes): payload['http'] has the key 200 (int)",
    ),
    (
        "too large",
        ("q", "e", b"x" * (2 << 20)),
        {},
        "message of 2097166 bytes (its PUBLISH frame) exceeds the frame limit",
    ),
]


async def test_bad_publishes_raise_at_the_call_and_leave_nothing_pending(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish("q", "e", 0) == 0  # "q" and "e" are now known names: the fast path
        for _what, args, kwargs, message in BAD:
            for _ in range(2):  # the second time the names may be cached
                with pytest.raises(LocalProtocolError, match=re.escape(message)):
                    await c.publish(*args, **kwargs)
                if "message_id" in kwargs:
                    continue  # publish_many takes no message ids
                with pytest.raises(LocalProtocolError, match=re.escape(message)):
                    await c.publish_many(args[0], [(args[1], args[2], kwargs.get("headers"))])
        assert not c._pending and not c._frames
        assert await c.publish("q", "e", 1) == 1


async def test_a_payload_with_an_int_map_key_is_refused_and_the_connection_carries_on(tmp_path: Path) -> None:
    """The broker's decoder takes only string (and bytes) map keys: a payload
    such as ``{"http": {200: "ok"}}`` is refused before sending, like any
    payload that cannot be sent, and the connection, its subscription
    included, carries on. (It was sent: the broker answered the fatal
    MALFORMED_FRAME and closed, and every later call on the client raised it.)"""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("ik", durable="w", start="earliest")
        await c.publish("ik", "x", {"status": "ok"})
        assert (await sub.next(timeout=10)).payload == {"status": "ok"}
        for payload in ({"http": {200: "ok"}}, [{"ok": 1}, {1.5: "no"}], {b"bytes": 1, None: 2}):
            with pytest.raises(LocalProtocolError, match=r"map keys must be strings \(or bytes\)"):
                await c.publish("ik", "x", payload)
        await c.publish("ik", "x", {b"bytes key": [1, {"nested": 2}]})
        assert (await sub.next(timeout=10)).payload == {b"bytes key": [1, {"nested": 2}]}
        await c.ping()
        assert (c.conn_id, c.reconnects) == (1, 0)


async def test_publish_many_sends_nothing_of_a_batch_with_a_message_it_cannot_send(tmp_path: Path) -> None:
    """Every message of a batch is checked before any is sent: a bad name, or
    an unsendable payload after more than FLUSH_BYTES of good messages (which
    the single publish path writes as it goes), raises and stores nothing;
    the offsets show it. (a and b were stored, and then LocalInvalidName,
    documented as "nothing was sent", was raised.)"""
    from client import _transport as client_module

    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish_many("other", [("a", 0), ("b", 0)]) == [0, 1]  # names known: the fast path
        with pytest.raises(LocalInvalidName, match="invalid event name 'bad name'"):
            await c.publish_many("pm", [("a", 1), ("b", 2), ("bad name", 3), ("c", 4)])
        many = [("a", b"x" * 100)] * (2 * client_module.FLUSH_BYTES // 100) + [("b", {1: "int key"}), ("c", 1)]
        with pytest.raises(LocalProtocolError, match="map keys must be strings"):
            await c.publish_many("pm", many)
        assert not c._pending and not c._frames
        assert await c.publish("pm", "first") == 0  # (on one connection the broker takes requests in order)
        assert await c.publish_many("pm", [("a", 1), ("b", 2, {"h": "v"}), ("new-event", 3)]) == [1, 2, 3]


async def test_fast_path_frames_are_the_ones_the_general_path_would_resend(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("q", "e", 0)
        first = c._send_publish("q", "e", {"k": [1, 2]}, None, "id-1")  # known names: fast
        second = c._send_publish("q", "e", {"k": [1, 2]}, {"h": "v"}, None)  # headers: general
        frames = dict(c._frames)
        assert [type(f) for f in frames.values()] == [bytes, Publish]  # the fast path keeps its bytes
        (req1, f1), (req2, f2) = frames.items()
        assert f1 == c._conn.encode(Publish(req1, "q", "e", {"k": [1, 2]}, None, "id-1"))
        assert f2 == Publish(req2, "q", "e", {"k": [1, 2]}, {"h": "v"}, None)
        assert await first == 1 and await second == 2  # a PUBLISH future resolves to the offset
        assert not c._frames


async def test_many_queue_and_event_names_keep_the_name_cache_bounded(tmp_path: Path) -> None:
    from client import _transport as client_module

    async with running_broker(tmp_path) as broker, connected(broker) as c:
        n = client_module.NAME_CACHE_SIZE + 10
        await c.publish_many("q", [(f"e{i}", i) for i in range(n)])
        assert len(c._event_names) <= client_module.NAME_CACHE_SIZE


async def test_many_publishes_in_one_turn_are_written_in_pieces(tmp_path: Path) -> None:
    """A window's worth of publishes made in one loop turn leaves in ~FLUSH_BYTES
    writes, not one block at the end of the turn (so the broker starts on the
    first while the client makes the rest), and every one is confirmed."""
    from client import _transport as client_module

    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("q", "e", b"")  # names known: the fast path
        assert c._sock is not None
        sizes: list[int] = []
        write = c._sock.write
        c._sock.write = lambda data: (sizes.append(len(data)), write(data))[1]
        futures = [c._send_publish("q", "e", b"x" * 100, None, None) for _ in range(2000)]  # one turn
        assert client_module.FLUSH_BYTES <= 64 * 1024
        assert len(sizes) >= 2000 * 100 // (64 * 1024)
        assert max(sizes) < client_module.FLUSH_BYTES + 200
        assert [await f for f in futures] == list(range(1, 2001))


async def test_publish_ack_says_whether_the_broker_had_the_message_already(tmp_path: Path) -> None:
    """publish() resolves to the bare offset (its hot path is unchanged);
    publish_ack() also gives the PUBACK's duplicate flag, on the fast path
    (names known, no headers) and the general one."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish_ack("q", "e", 0, message_id="a") == (0, False)  # names new: general path
        assert await c.publish_ack("q", "e", 0, message_id="a") == (0, True)  # names known: fast path
        assert await c.publish_ack("q", "e", 0, headers={"h": "v"}, message_id="a") == (0, True)
        assert await c.publish_ack("q", "e", 1) == (1, False)
        both = await asyncio.gather(c.publish_ack("q", "e", 2, message_id="b"), c.publish("q", "e", 3, message_id="b"))
        assert list(both) == [(2, False), 2]  # one write: stored once; publish() still gives the offset alone
        assert type(await c.publish("q", "e", 4, message_id="a")) is int
        assert not c._duplicates and not c._pending


@pytest.mark.parametrize(
    ("bad", "why"),
    [("", "message_id must not be empty"), ("m" * 256, "message_id of 256 characters, more than 255")],
    ids=["empty", "too-long"],
)
async def test_an_empty_or_too_long_message_id_is_refused_by_the_client_and_the_broker(
    tmp_path: Path, bad: str, why: str
) -> None:
    """An empty id (an unset variable, most likely) would make every later
    publish with it a duplicate, dropped; an id longer than 255 characters
    (AMQP's limit) would be memory, kept for the dedup window, as long as a
    message. Either is BAD_REQUEST, found before sending on either publish
    path, and by the broker for any client; 255 characters are fine."""
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as c:
            for _ in range(2):  # names new (general path), then known (fast path)
                with pytest.raises(BadRequest, match=why) as info:
                    await c.publish("q", "e", 1, message_id=bad)
                assert isinstance(info.value, LocalProtocolError)
                await c.publish("q", "e", 0)
            assert not c._pending
            assert await c.publish("q", "e", 1, message_id="m" * 255) == 2
        peer = await RawPeer.connect(broker)
        peer.send_wire([int(FrameType.PUBLISH), 2, "q", "e", 1, None, bad])
        reply = await peer.recv()
        assert isinstance(reply, Err) and (reply.req, reply.code) == (2, ErrorCode.BAD_REQUEST), reply
        assert why in reply.message
        peer.send_wire([int(FrameType.PUBLISH), 3, "q", "e", 1, None, "x"])
        assert await peer.recv() == PubAck(3, 3, False)  # the connection carries on
        peer.close()


async def test_a_client_keeps_its_attributes_in_slots(tmp_path: Path) -> None:
    """CPython 3.11 keeps fewer than 30 instance attributes of a class in its
    fast layout, and a client has more than 50: in an instance dict they cost
    the publish path 2.6% of its instructions (window 1,000) and 3.7%
    (window 1) in bench.instructions, so they are slots (see
    ``Reconnecting.__slots__``). The client has no dict: were a class of the
    chain to lose its ``__slots__``, a dict would come back and take, unseen,
    any attribute missing from them (today such an assignment fails). A
    structural check, not a timing: a client that has published on both
    paths, subscribed, acked, fetched and been closed."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("q", "e", 0)
        await c.publish("q", "e", 1)  # names known: the fast path
        await c.publish_ack("q", "e", 2, headers={"h": "v"})
        async with await c.subscribe("q", durable="d", start="earliest") as sub:
            msg = await anext(aiter(sub))
            await msg.ack()
        await c.fetch("q", max_messages=1)
        await c.ping()
    assert not hasattr(c, "__dict__"), sorted(vars(c))
    assert weakref.ref(c)() is c  # as before the slots
