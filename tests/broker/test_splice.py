"""The broker's splice path end to end: a Session on a real broker and real files.

For random PUBLISH streams (tests/protocol/strategies.py: every msgpack
encoding, repeats that the broker splices, broken frames) the session must
store and answer exactly what the general path (``Connection.events()``,
``encode_record``, the size limit) says: the same record bytes at the same
offsets, the same PUBACKs, the same ERRs with the same codes and messages.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, assume, given, settings

from broker import Broker
from broker.config import FsyncPolicy
from broker.session import Session
from protocol import (
    PROTOCOL_VERSION,
    Connection,
    Err,
    FrameDecoder,
    Hello,
    InvalidRequest,
    Limits,
    Ping,
    Pong,
    PubAck,
    Publish,
    RemoteProtocolError,
    Role,
    Welcome,
    encode_frame,
    encode_record,
)
from protocol.framing import HEADER, unpack_body
from protocol.messages import FRAME_CLASSES
from protocol.wire import locate_plain_publish
from tests.helpers import running_broker
from tests.protocol.strategies import publish_streams

#: Small frames, so that some records pass the message limit (max_frame_size - 512).
LIMITS = Limits(max_frame_size=704, handshake_frame_size=704)  # records up to 192 bytes, as before


class Wire:
    """The transport under a Session: keeps what it writes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def frames_of(data: bytes) -> list[Any]:
    return [
        FRAME_CLASSES[(items := unpack_body(b, 1 << 24))[0]].from_wire(items) for b in FrameDecoder(1 << 24).feed(data)
    ]


def general_path(stream: bytes) -> list[Any] | RemoteProtocolError:
    """What a broker Connection's events() makes of ``stream`` after the handshake."""
    conn = Connection(Role.BROKER, limits=LIMITS)
    conn.receive_data(encode_frame(Hello(1, PROTOCOL_VERSION, "t").to_wire()))
    conn.events()
    conn.send(Welcome(1, PROTOCOL_VERSION, "t", 1, LIMITS.max_frame_size, 0.0))
    conn.receive_data(stream)
    try:
        return list(conn.events())
    except RemoteProtocolError as exc:
        return exc


def splices(bodies: list[bytes]) -> int:
    """How many of ``bodies`` the broker can splice: plain, with names a valid plain publish taught it."""
    known: set[bytes] = set()
    n = 0
    for body in bodies:
        at = locate_plain_publish(body)
        if at is None:
            continue
        names = body[at[1] : at[2]]
        if names in known:
            n += 1
        elif type(general_path(HEADER.pack(len(body)) + body)) is list:
            known.add(names)
    return n


async def test_spliced_publishes_are_stored_and_answered_as_the_general_path_does(tmp_path: Path) -> None:
    cases: list[tuple[bytes, list[bytes]]] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(publish_streams())
    def collect(bodies: list[bytes]) -> None:
        stream = b"".join(HEADER.pack(len(b)) + b for b in bodies)
        reference = general_path(stream)
        # Only PUBLISHes without a message_id (their dedup is another test's), also before bad bytes.
        handled = reference.before if isinstance(reference, RemoteProtocolError) else reference
        assume(all(type(e) in (Ping, InvalidRequest) or (type(e) is Publish and not e.message_id) for e in handled))
        cases.append((stream, bodies))

    await asyncio.to_thread(collect)  # (not on the loop: it takes seconds)
    spliced = 0
    async with running_broker(tmp_path, limits=LIMITS, fsync=FsyncPolicy.NEVER) as broker:
        limit = broker.config.max_message_bytes
        for stream, bodies in cases:
            spliced += splices(bodies)
            before = {name: q.log.next_offset for name, q in broker.store.queues.items()}
            session, wire = Session(broker), Wire()
            session.connection_made(wire)  # type: ignore[arg-type]
            session.data_received(encode_frame(Hello(1, PROTOCOL_VERSION, "t").to_wire()))
            assert type(frames_of(bytes(wire.data))[0]) is Welcome
            del wire.data[:]
            session.data_received(stream)
            for _ in range(1000):  # (with fsync never the confirms are immediate)
                if not session.unconfirmed:
                    break
                await asyncio.sleep(0.001)
            now_ms, replies = session._now_ms, frames_of(bytes(wire.data))
            session.connection_lost(None)

            # What the general path says, for the same stream, at the same time.
            reference = general_path(stream)
            expect_replies: list[Any] = []
            expect_records: dict[str, list[bytes]] = {}
            # After bad bytes: the events before them are handled as usual, then the ERR.
            handled = reference.before if isinstance(reference, RemoteProtocolError) else reference
            for ev in handled:
                if type(ev) is Ping:
                    expect_replies.append(Pong(ev.req))
                    continue
                if type(ev) is InvalidRequest:
                    expect_replies.append(Err(ev.req, int(ev.code), ev.message[:1024]))
                    continue
                body = encode_record(ev.event, now_ms, ev.headers, ev.payload)
                if len(body) > limit:
                    message = f"message of {len(body)} bytes exceeds the limit of {limit} bytes"
                    expect_replies.append(Err(ev.req, 22, message))
                    continue
                records = expect_records.setdefault(ev.queue, [])
                expect_replies.append(PubAck(ev.req, before.get(ev.queue, 0) + len(records), False))
                records.append(body)
            if isinstance(reference, RemoteProtocolError):
                expect_replies.append(Err(0, int(reference.code), str(reference)[:1024]))
            assert Counter(map(repr, replies)) == Counter(map(repr, expect_replies))
            for name, queue in broker.store.queues.items():
                start = before.get(name, 0)
                stored = queue.log.read(start, max_count=1 << 20, max_bytes=1 << 30)
                assert [body for _, _, body in stored] == expect_records.get(name, [])
                assert all(ts == now_ms for _, ts, _ in stored)

            # As a producer (resends are confirmed, not stored again): one reply per request.
            replies = await feed(broker, stream, producer=f"p{len(before)}-{now_ms}")
            if isinstance(reference, RemoteProtocolError):  # the fatal ERR comes last
                assert replies[-1] == Err(0, int(reference.code), str(reference)[:1024])
                replies = replies[:-1]
            assert sorted(r.req for r in replies) == sorted(e.req for e in handled)
    assert spliced > len(cases) // 4  # the splice path was exercised


async def feed(broker: Broker, *chunks: bytes, producer: str | None = None) -> list[Any]:
    """Feed ``chunks`` to a new session (one read each) and return its replies once confirmed."""
    session, wire = Session(broker), Wire()
    session.connection_made(wire)  # type: ignore[arg-type]
    session.data_received(encode_frame(Hello(1, PROTOCOL_VERSION, "t", None, producer).to_wire()))
    assert type(frames_of(bytes(wire.data))[0]) is Welcome
    del wire.data[:]
    for chunk in chunks:
        session.data_received(chunk)
    for _ in range(1000):
        if not session.unconfirmed:
            break
        await asyncio.sleep(0.001)
    session.connection_lost(None)
    return frames_of(bytes(wire.data))


async def test_a_read_of_nothing_but_resends_is_confirmed(tmp_path: Path) -> None:
    async with running_broker(tmp_path, fsync=FsyncPolicy.NEVER) as broker:
        for payload in (b"\xc4\x01x", b"\x81\xa2id\x07"):  # a bin (copied) and a map (re-encoded)
            frames = [encode_frame([3, req, "Q", "E", msgpack.unpackb(payload), None, None]) for req in (1, 2, 3)]
            # The first read teaches the names and stores 1-3 (2 and 3 spliced); the
            # second is all resends, the third resends and a new one.
            first = await feed(
                broker,
                b"".join(frames),
                frames[1] + frames[2],
                frames[0] + frames[2] + frames[2].replace(b"\x03\xa1Q", b"\x04\xa1Q"),
                producer=f"p{payload[0]}",
            )
            base = first[0].offset
            assert [(a.req, a.offset - base, a.duplicate) for a in first] == [
                (1, 0, False), (2, 1, False), (3, 2, False),
                (2, 1, True), (3, 2, True),
                (1, 0, True), (3, 2, True), (4, 3, False),
            ]  # fmt: skip
