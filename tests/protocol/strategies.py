"""Hypothesis strategies for every frame of the protocol."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from hypothesis import strategies as st

from protocol import (
    Ack,
    Batch,
    Bye,
    Delete,
    Deliver,
    Err,
    Fetch,
    Frame,
    Hello,
    Nack,
    Ok,
    Ping,
    Pong,
    Progress,
    PubAck,
    Publish,
    Record,
    Seek,
    Status,
    StatusReply,
    Subscribe,
    Unsubscribe,
    Welcome,
)

U64 = st.integers(0, (1 << 64) - 1)
REQ = st.integers(0, (1 << 32))
NAMES = st.from_regex(r"\A[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}\Z")
EVENTS = st.from_regex(r"\A[A-Za-z0-9_-][A-Za-z0-9._:/-]{0,40}\Z")
PATTERNS = st.from_regex(r"\A[A-Za-z0-9_*-][A-Za-z0-9._:/*-]{0,20}\Z")
HEADERS = st.none() | st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)

# Any msgpack value that round-trips to itself (lists, not tuples; str keys; no NaN).
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=30)
)
PAYLOADS: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def starts(draw: st.DrawFn) -> tuple[str, int | None]:
    kind = draw(st.sampled_from(["new", "earliest", "offset", "time"]))
    return kind, (draw(U64) if kind in ("offset", "time") else None)


@st.composite
def subscribes(draw: st.DrawFn) -> Subscribe:
    start, value = draw(starts())
    return Subscribe(
        req=draw(REQ), sub_id=draw(REQ), queue=draw(NAMES), events=tuple(draw(st.lists(PATTERNS, max_size=3))),
        durable=draw(st.none() | NAMES), start=start, start_value=value, prefetch=draw(st.integers(1, 1 << 20)),
        ack_wait_ms=draw(st.integers(0, 1 << 40)), max_deliveries=draw(st.integers(0, 1 << 31)),
        dead_letter=draw(st.none() | NAMES),
    )  # fmt: skip


@st.composite
def fetches(draw: st.DrawFn) -> Fetch:
    start, value = draw(starts())
    return Fetch(
        req=draw(REQ), queue=draw(NAMES), durable=draw(st.none() | NAMES),
        events=tuple(draw(st.lists(PATTERNS, max_size=3))), max_messages=draw(st.integers(0, 1 << 20)),
        wait_ms=draw(st.integers(0, 1 << 40)), start=start, start_value=value,
        ack_wait_ms=draw(st.integers(0, 1 << 40)),
    )  # fmt: skip


RECORDS = st.builds(Record, U64, U64, EVENTS, U64, HEADERS, PAYLOADS)
OFFSETS = st.lists(U64, max_size=5).map(tuple)

FRAMES: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Hello,
        REQ,
        U64,
        st.text(max_size=50),
        st.none() | st.dictionaries(st.text(max_size=5), SCALARS),
        st.none() | st.text(min_size=1, max_size=64),
    ),
    st.builds(Welcome, REQ, U64, st.text(max_size=20), U64, U64, st.floats(0, 1e6)),
    st.builds(Publish, REQ, NAMES, EVENTS, PAYLOADS, HEADERS, st.none() | st.text(min_size=1, max_size=20)),
    st.builds(PubAck, REQ, U64, st.booleans()),
    subscribes(),
    st.builds(Unsubscribe, REQ, REQ),
    st.builds(Deliver, REQ, U64, U64, EVENTS, U64, HEADERS, PAYLOADS),
    st.builds(Ack, REQ, NAMES, NAMES, OFFSETS, st.none() | U64),
    st.builds(Nack, REQ, NAMES, NAMES, OFFSETS, st.integers(0, 1 << 40)),
    st.builds(Progress, REQ, NAMES, NAMES, OFFSETS),
    st.builds(Delete, REQ, NAMES, st.none() | NAMES),
    starts().flatmap(lambda s: st.builds(Seek, REQ, NAMES, NAMES, st.just(s[0]), st.just(s[1]))),
    fetches(),
    st.builds(Batch, REQ, U64, st.lists(RECORDS, max_size=3).map(tuple)),
    st.builds(Status, REQ),
    st.builds(StatusReply, REQ, st.dictionaries(st.text(max_size=8), PAYLOADS, max_size=4)),
    st.builds(Ping, REQ),
    st.builds(Pong, REQ),
    st.builds(Ok, REQ),
    st.builds(Err, REQ, st.integers(0, 1 << 16), st.text(max_size=40)),
    st.builds(Bye, REQ),
)


# --- raw PUBLISH bodies in every msgpack encoding (the broker's splice path) ---------
# Built byte by byte, so that every format a peer may choose appears: each int
# width for req, fixstr/str8/str16 names, bin payloads in the shortest and in
# wider formats, ext, float 32, invalid UTF-8, and broken variants. Weights
# are drawn as integers whose 0 end (where hypothesis starts) is the common case.

_INT_FORMATS: list[tuple[bytes, str, int, int]] = [
    (b"", ">B", 0, 0x7F),  # positive fixint
    (b"", ">b", -32, -1),  # negative fixint
    (b"\xcc", ">B", 0, (1 << 8) - 1),
    (b"\xcd", ">H", 0, (1 << 16) - 1),
    (b"\xce", ">I", 0, (1 << 32) - 1),
    (b"\xcf", ">Q", 0, (1 << 64) - 1),
    (b"\xd0", ">b", -(1 << 7), (1 << 7) - 1),
    (b"\xd1", ">h", -(1 << 15), (1 << 15) - 1),
    (b"\xd2", ">i", -(1 << 31), (1 << 31) - 1),
    (b"\xd3", ">q", -(1 << 63), (1 << 63) - 1),
]


@st.composite
def msgpack_ints(draw: st.DrawFn) -> bytes:
    """An int in any msgpack format that can hold it (fixint, uint 8-64, int 8-64)."""
    unsigned = draw(st.integers(0, 2)) < 2  # mostly: what a client writes for a req
    tag, fmt, lo, hi = draw(st.sampled_from([_INT_FORMATS[i] for i in (0, 2, 3, 4, 5)] if unsigned else _INT_FORMATS))
    value = draw(st.integers(lo, hi) | st.sampled_from([lo, hi]))
    return tag + struct.pack(fmt, value)


def _sized(data: bytes, kind: str, fmt: str) -> bytes:
    n = len(data)
    if fmt == "fix":  # fixstr (only str has a fix format)
        return bytes([0xA0 | n]) + data
    tag = {"str": {"8": 0xD9, "16": 0xDA, "32": 0xDB}, "bin": {"8": 0xC4, "16": 0xC5, "32": 0xC6}}[kind][fmt]
    return bytes([tag]) + n.to_bytes(int(fmt) // 8, "big") + data


@st.composite
def msgpack_strs(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes:
    """A str (or a bin, or non-UTF-8 bytes) in any format that can hold it."""
    raw = draw(st.integers(0, 9)) == 9
    data = draw(st.binary(max_size=40)) if raw else draw(text).encode()  # raw: often not UTF-8
    kind = "bin" if draw(st.integers(0, 19)) == 19 else "str"
    fits = [f for f, cap in (("fix", 32), ("8", 1 << 8), ("16", 1 << 16), ("32", 1 << 32)) if len(data) < cap]
    if kind == "bin" and "fix" in fits:
        fits.remove("fix")
    shortest = draw(st.integers(0, 3)) < 3  # what msgpack writes; else any that fits
    return _sized(data, kind, fits[0] if shortest else draw(st.sampled_from(fits)))


#: Queue and event names: mostly valid, some too long, some breaking the rules.
LONG_NAMES = st.from_regex(r"\A[A-Za-z0-9_-][A-Za-z0-9._-]{25,140}\Z")
NAME_TEXT = NAMES | EVENTS | LONG_NAMES | st.text(max_size=6)


@st.composite
def bins(draw: st.DrawFn) -> bytes:
    """A bin payload: mostly short, some at the format boundaries; any format that holds it."""
    big = draw(st.integers(0, 19)) == 19
    n = draw(st.sampled_from([255, 256, 65535, 65536, 65537]) if big else st.integers(0, 300))
    pattern = draw(st.binary(min_size=1, max_size=8))
    data = (pattern * (n // len(pattern) + 1))[:n]
    fits = [f for f, cap in (("8", 1 << 8), ("16", 1 << 16), ("32", 1 << 32)) if n < cap]
    shortest = draw(st.integers(0, 3)) < 3
    return _sized(data, "bin", fits[0] if shortest else draw(st.sampled_from(fits)))


@st.composite
def exts(draw: st.DrawFn) -> bytes:
    """An ext value (refused on the wire except ext 8/16/32 with no data)."""
    code = draw(st.integers(-128, 127)).to_bytes(1, "big", signed=True)
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    size = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 8, 16]))
    if size in fixed and draw(st.booleans()):
        return bytes([fixed[size]]) + code + bytes(size)
    tag, width = draw(st.sampled_from([(0xC7, 1), (0xC8, 2), (0xC9, 4)]))
    return bytes([tag]) + size.to_bytes(width, "big") + code + bytes(size)


RAW_PAYLOADS: st.SearchStrategy[bytes] = st.one_of(
    PAYLOADS.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    exts(),
    msgpack_ints(),
    st.floats(width=32, allow_nan=False).map(lambda f: b"\xca" + struct.pack(">f", f)),
    msgpack_strs(st.text(max_size=40)),
    st.binary(max_size=6),  # anything
)


#: Encoded headers: nil, maps good and bad, and values that end in nil as nil does.
HEADER_VARIANTS = [b"\xc0", b"\x80", b"\x81\xa1k\xa1v", b"\x81\x01\x02", b"\x90", b"\x81\xa1k\xc0", b"\x91\xc0"]


@st.composite
def publish_bodies(draw: st.DrawFn, names: bytes | None = None) -> bytes:
    """The body of a PUBLISH frame, mostly plain ``[3, req, queue, event, payload, nil, nil]``
    in any encoding, sometimes with headers, a message_id, another shape or type, or broken.

    Args:
        names: the queue and event encodings to use (else drawn).
    """
    plain = draw(st.integers(0, 4)) < 4
    head = b"\x97" if plain or draw(st.booleans()) else draw(st.sampled_from([b"\x96", b"\x98", b"\xdc\x00\x07"]))
    kind = b"\x03" if plain or draw(st.booleans()) else draw(msgpack_ints())
    if names is None:
        names = draw(msgpack_strs(NAME_TEXT)) + draw(msgpack_strs(NAME_TEXT))
    headers = b"\xc0" if plain else draw(st.sampled_from(HEADER_VARIANTS))
    mid = b"\xc0" if plain else draw(st.sampled_from([b"\xc0", b"\xa2id", b"\x07"]))
    payload = draw(bins() if draw(st.integers(0, 3)) < 3 else RAW_PAYLOADS)
    body = head + kind + draw(msgpack_ints()) + names + payload + headers + mid
    if draw(st.integers(0, 9)) == 9:  # broken: cut, extended or changed somewhere
        at = draw(st.integers(0, len(body)))
        how = draw(st.sampled_from(["cut", "add", "set"]))
        if how == "cut":
            body = body[:at]
        elif how == "add":
            body = body[:at] + draw(st.binary(min_size=1, max_size=3)) + body[at:]
        elif at < len(body):
            body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    return body


@st.composite
def publish_streams(draw: st.DrawFn) -> list[bytes]:
    """PUBLISH bodies sharing a few queue + event encodings, each often repeated
    (a repeat finds its names known, so the broker may splice it), and a PING or two."""
    text = st.one_of(NAMES, NAMES, NAMES, NAMES, NAME_TEXT)  # mostly valid: their frames may be spliced
    pool = draw(st.lists(st.tuples(msgpack_strs(text), msgpack_strs(text)).map(b"".join), min_size=1, max_size=3))
    bodies = draw(st.lists(st.sampled_from(pool).flatmap(lambda n: publish_bodies(n)), min_size=1, max_size=4))
    order = draw(st.lists(st.integers(0, len(bodies) - 1), min_size=1, max_size=8))
    stream = bodies + [bodies[i] for i in order]
    for at in draw(st.lists(st.integers(0, len(stream)), max_size=2)):  # a PING ends a run of publishes
        stream.insert(at, b"\x92\x0f" + draw(msgpack_ints()))
    return stream
