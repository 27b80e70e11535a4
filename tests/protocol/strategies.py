"""Hypothesis strategies for every frame of the protocol."""

from __future__ import annotations

from typing import Any

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
    st.builds(Publish, REQ, NAMES, EVENTS, PAYLOADS, HEADERS, st.none() | st.text(max_size=20)),
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
