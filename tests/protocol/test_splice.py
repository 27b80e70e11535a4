"""The broker's splice path: ``locate_plain_publish`` and ``Connection.events_spliced``.

The claim under test: for any bytes, ``events_spliced()`` says what
``events()`` says (the same frames, the same errors with the same code and
message), except that a plain PUBLISH whose names it has seen may come out as
a SplicedPublish tuple, and then the record body built from the tuple is byte
for byte the one ``encode_record`` writes for the decoded frame.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from protocol import (
    Connection,
    ErrorCode,
    Publish,
    RemoteProtocolError,
    Role,
    encode_record,
)
from protocol.framing import HEADER, unpack_body
from protocol.wire import locate_plain_publish

from .strategies import EVENTS, NAMES, PAYLOADS, bins, msgpack_ints, publish_bodies, publish_streams
from .test_connection import handshaken

TS = 1_763_900_000_123  # a timestamp for the records compared below


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def record_of(event: Any) -> bytes | None:
    """The record body the broker stores for an event of either path (None: not a plain PUBLISH)."""
    if type(event) is tuple:
        _req, _queue, head, payload = event
        return bytes(head + msgpack.packb(TS) + b"\xc0" + payload)
    if type(event) is Publish and event.headers is None and event.message_id is None:
        return encode_record(event.event, TS, None, event.payload)
    return None


def outcome(conn: Connection, spliced: bool, *, stats: bool = False) -> tuple[str, Any]:
    """What one ``events()`` (or ``events_spliced()``) call gives, in a comparable form."""
    try:
        events = conn.events_spliced() if spliced else conn.events()
    except RemoteProtocolError as exc:
        assert conn.failed is exc
        return "error", (exc.code, str(exc), comparable(exc.before, stats))
    return "events", comparable(events, stats)


def comparable(events: list[Any], stats: bool) -> list[Any]:
    out: list[Any] = []
    for ev in events:
        if type(ev) is tuple:
            if stats:
                event("spliced")
            out.append(("publish", ev[0], ev[1], record_of(ev)))
        elif record_of(ev) is not None:
            assert type(ev) is Publish
            out.append(("publish", ev.req, ev.queue, record_of(ev)))
        else:
            out.append(ev)
    return out


# --- locate_plain_publish ------------------------------------------------------


@settings(max_examples=2000)
@given(publish_bodies() | st.binary(max_size=60))
def test_locate_finds_only_plain_publishes_and_their_fields(body: bytes) -> None:
    at = locate_plain_publish(body)
    if at is None:
        return
    req, names, payload, whole = at
    unpacker = msgpack.Unpacker(unicode_errors="surrogateescape")
    unpacker.feed(body[2:payload])
    assert [type(v) for v in unpacker] == [int, str, str]  # req, queue, event exactly
    assert body[:2] == b"\x97\x03" and body[-2:] == b"\xc0\xc0"
    if not whole:
        return  # the payload is for the general path's decoder to check
    event("whole")
    # Exactly one msgpack value (the names' UTF-8 is not checked here: see events_spliced).
    items = msgpack.unpackb(body, unicode_errors="surrogateescape")
    assert items[0] == 3 and items[1] == req and items[5:] == [None, None]
    assert type(items[2]) is str and type(items[3]) is str and type(items[4]) is bytes
    unpacker = msgpack.Unpacker(unicode_errors="surrogateescape")
    unpacker.feed(body[names:payload])
    assert list(unpacker) == items[2:4]  # exactly queue and event
    assert body[payload:-2] == msgpack.packb(items[4], use_bin_type=True)  # as the broker would write it


@given(msgpack_ints(), NAMES, EVENTS, bins())
def test_locate_takes_every_unsigned_req_and_only_the_shortest_bin(
    req: bytes, queue: str, ev: str, payload: bytes
) -> None:
    names = msgpack.packb(queue) + msgpack.packb(ev)
    body = b"\x97\x03" + req + names + payload + b"\xc0\xc0"
    decoded = unpack_body(body, 1 << 24)
    canonical = msgpack.packb(decoded[4], use_bin_type=True) == payload
    at = locate_plain_publish(body)
    if decoded[1] >= 0 and req[0] < 0xD0:  # fixint or uint
        assert at == (decoded[1], 2 + len(req), 2 + len(req) + len(names), canonical)
    else:
        assert at is None


# --- events_spliced == events ---------------------------------------------------


@settings(max_examples=1000)
@given(publish_streams(), st.data())
def test_events_spliced_says_what_events_says(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(map(frame, bodies))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    general, spliced = handshaken()[1], handshaken()[1]
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        general.receive_data(stream[a:b])
        spliced.receive_data(stream[a:b])
        expect = outcome(general, False)
        assert outcome(spliced, True, stats=True) == expect
        assert spliced.state is general.state
        if expect[0] == "error":
            break


@settings(max_examples=500)
@given(msgpack_ints(), NAMES, EVENTS, PAYLOADS | bins().map(lambda b: msgpack.unpackb(b)), st.data())
def test_a_valid_plain_publish_is_spliced_once_its_names_are_known(
    req: bytes, queue: str, ev: str, payload: Any, data: st.DataObject
) -> None:
    value = unpack_body(req, 64)
    packed = msgpack.packb(payload, use_bin_type=True)
    names = data.draw(st.sampled_from([msgpack.packb(queue) + msgpack.packb(ev), _str8(queue) + _str8(ev)]))
    body = b"\x97\x03" + req + names + packed + b"\xc0\xc0"
    conn = handshaken()[1]
    conn.receive_data(frame(body) * 3)
    if value < 0:
        assert outcome(conn, True)[0] == "error"  # a negative req is malformed, on either path
        return
    first, *again = conn.events_spliced()
    assert first == Publish(value, queue, ev, payload)  # new names: the general path
    for later in again:
        if req[0] < 0xD0:  # an unsigned req: spliced (a bin payload as sent, others re-encoded)
            assert later == (value, queue, msgpack.packb(ev), packed)
        else:
            assert later == first
        assert record_of(later) == record_of(first)


def _str8(name: str) -> bytes:
    return b"\xd9" + bytes([len(name)]) + name.encode()


def test_the_deepest_payload_is_spliced_and_a_deeper_one_refused_as_before() -> None:
    # msgpack decodes 1,024 nested arrays: the frame's and 1,023 in the payload.
    deepest, deeper = b"\x91" * 1023 + b"\xc0", b"\x91" * 1024 + b"\xc0"
    for conn, spliced in ((handshaken()[1], True), (handshaken()[1], False)):
        conn.receive_data(frame(b"\x97\x03\x01\xa1Q\xa1E\xc4\x01x\xc0\xc0"))
        conn.receive_data(frame(b"\x97\x03\x02\xa1Q\xa1E" + deepest + b"\xc0\xc0"))
        _first, second = outcome(conn, spliced)[1]
        assert second[3] == encode_record("E", TS, None, msgpack.unpackb(deepest))
        conn.receive_data(frame(b"\x97\x03\x03\xa1Q\xa1E" + deeper + b"\xc0\xc0"))
        kind, (code, _message, _before) = outcome(conn, spliced)
        assert (kind, code) == ("error", ErrorCode.MALFORMED_FRAME)


@pytest.mark.parametrize(
    ("tail", "code"),
    [
        (b"\x81\xa1k\xc0\xc0", ErrorCode.MALFORMED_FRAME),  # headers {"k": nil}, then nil: ends like nil, nil
        (b"\x91\xc0\xc0", ErrorCode.MALFORMED_FRAME),  # headers [nil]
        (b"\xc0\xc0\xc0", ErrorCode.MALFORMED_FRAME),  # one nil too many
        (b"\xc0", ErrorCode.MALFORMED_FRAME),  # one too few
    ],
)
def test_a_known_publish_whose_tail_only_looks_plain_is_refused_as_before(tail: bytes, code: ErrorCode) -> None:
    head = b"\x97\x03\x01\xa1Q\xa1E"
    for payload in (b"\xc4\x01x", b"\x81\xa2id\x07"):  # a bin and a map
        results = []
        for spliced in (True, False):
            conn = handshaken()[1]
            conn.receive_data(frame(head + b"\xc4\x01x\xc0\xc0") + frame(head + payload + tail))
            results.append(outcome(conn, spliced))
        assert results[0] == results[1] and results[0][0] == "error" and results[0][1][0] is code


def test_names_are_learned_only_from_frames_the_general_path_accepts() -> None:
    conn = handshaken()[1]
    bad = b"\x97\x03\x01\xa3Q/.\xa1E\xc4\x01x\xc0\xc0"  # queue "Q/." breaks the name rules
    conn.receive_data(frame(bad) * 2)
    assert [(e.code, e.req) for e in conn.events_spliced()] == [(ErrorCode.INVALID_NAME, 1)] * 2  # type: ignore[union-attr]
    good = b"\x97\x03\x01\xa1Q\xa1E\xc4\x01x\xc0\xc0"
    conn.receive_data(frame(good) * 2)
    assert conn.events_spliced() == [Publish(1, "Q", "E", b"x"), (1, "Q", b"\xa1E", b"\xc4\x01x")]


def test_outside_ready_a_plain_publish_is_refused_as_before() -> None:
    conn = Connection(Role.BROKER)  # no HELLO yet
    conn.receive_data(frame(b"\x97\x03\x01\xa1Q\xa1E\xc4\x01x\xc0\xc0"))
    assert outcome(conn, True) == ("error", (ErrorCode.UNEXPECTED_FRAME, "unexpected PUBLISH in state HANDSHAKE", []))


@settings(max_examples=1000)
@given(st.lists(st.binary(max_size=40), max_size=10))
def test_random_bytes_after_a_known_publish_raise_only_remote_protocol_errors(chunks: list[bytes]) -> None:
    conn = handshaken()[1]
    good = frame(b"\x97\x03\x01\xa1Q\xa1E\xc4\x01x\xc0\xc0")
    conn.receive_data(good)
    conn.events_spliced()  # names known: later plain frames may be spliced
    try:
        for chunk in chunks:
            conn.receive_data(good[:6] + chunk)  # a prefix that looks like a plain PUBLISH
            for ev in conn.events_spliced():
                assert ev is not None
    except RemoteProtocolError as exc:
        assert exc.code in (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNEXPECTED_FRAME)
        assert conn.failed is exc
