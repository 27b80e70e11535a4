"""Framing and frame codec: round trips, hot-path encoders, hostile bytes."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Batch,
    Deliver,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    LocalProtocolError,
    PubAck,
    Publish,
    Record,
    RemoteProtocolError,
    encode_batch,
    encode_deliver,
    encode_frame,
    encode_pubacks,
    encode_record,
    record_event,
)
from protocol.framing import unpack_body
from protocol.messages import FRAME_CLASSES
from protocol.wire import BATCH_OVERHEAD, BATCH_RECORD_OVERHEAD, decode_fixed_puback

from .strategies import EVENTS, FRAMES, HEADERS, PAYLOADS, U64

LIMIT = 4096


def decode_frame(body: bytes) -> Frame:
    items = unpack_body(body, 1 << 20)
    return FRAME_CLASSES[items[0]].from_wire(items)


@given(FRAMES)
def test_every_frame_round_trips(frame: Frame) -> None:
    wire = encode_frame(frame.to_wire())
    (body,) = FrameDecoder(1 << 20).feed(wire)
    assert decode_frame(body) == frame


@given(st.lists(FRAMES, min_size=1, max_size=5), st.data())
def test_split_at_any_points_yields_the_same_frames(frames: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(f.to_wire()) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = FrameDecoder(1 << 20)
    got: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[a:b])
    assert [decode_frame(b) for b in got] == frames
    assert decoder.buffered == 0


def test_split_at_every_byte() -> None:
    frames = [PubAck(1, 2), Deliver(3, 4, 1, "CREATE", 5, {"k": "v"}, {"id": [1, 2.5, b"x"]}), PubAck(9, 10, True)]
    wire = b"".join(encode_frame(f.to_wire()) for f in frames)
    decoder = FrameDecoder(LIMIT)
    got = [b for i in range(len(wire)) for b in decoder.feed(wire[i : i + 1])]
    assert [decode_frame(b) for b in got] == frames


@given(st.integers(0, 1 << 30), EVENTS, U64, HEADERS, PAYLOADS)
def test_encode_deliver_equals_the_generic_encoder(sub_id: int, event: str, ts: int, headers, payload) -> None:  # type: ignore[no-untyped-def]
    body = encode_record(event, ts, headers, payload)
    assert record_event(body) == event
    fast = encode_deliver(sub_id, 7, 2, body)
    assert fast == encode_frame(Deliver(sub_id, 7, 2, event, ts, headers, payload).to_wire())


@given(U64, U64, st.lists(st.tuples(U64, U64, EVENTS, U64, HEADERS, PAYLOADS), max_size=20))
def test_encode_batch_equals_the_generic_encoder(req: int, next_offset: int, recs) -> None:  # type: ignore[no-untyped-def]
    stored = [(off, n, encode_record(ev, ts, h, p)) for off, n, ev, ts, h, p in recs]
    fast = encode_batch(req, next_offset, stored)
    (body,) = FrameDecoder(1 << 24).feed(fast)
    assert decode_frame(body) == Batch(req, next_offset, tuple(Record(*r) for r in recs))
    assert len(body) <= BATCH_OVERHEAD + sum(len(b) + BATCH_RECORD_OVERHEAD for _, _, b in stored)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_batch_overheads_bound_the_frame_and_are_reached(n: int) -> None:
    """What the broker counts to keep a BATCH within the frame limit: with
    every number at its widest and 65,536 records or more, the frame is
    exactly that big; never bigger."""
    big = 2**64 - 1
    body = encode_record("e", 1, None, None)
    frame = encode_batch(big, big, [(big, big, body)] * n)
    worst = BATCH_OVERHEAD + n * (len(body) + BATCH_RECORD_OVERHEAD)
    assert len(frame) - 4 == worst - (0 if n >= 65536 else 2 if n >= 16 else 4)


def test_encode_batch_with_many_records_uses_wide_array_headers() -> None:
    body = encode_record("e", 1, None, None)
    for n in (15, 16, 65535, 65536):
        (frame,) = FrameDecoder(1 << 24).feed(encode_batch(1, n, [(i, 1, body) for i in range(n)]))
        batch = decode_frame(frame)
        assert isinstance(batch, Batch) and len(batch.records) == n and batch.records[-1].offset == n - 1


@given(st.lists(st.tuples(U64, U64, st.booleans()), max_size=10))
def test_encode_pubacks(acks: list[tuple[int, int, bool]]) -> None:
    bodies = FrameDecoder(LIMIT).feed(encode_pubacks(acks))
    assert [decode_frame(b) for b in bodies] == [PubAck(*a) for a in acks]  # any msgpack decoder
    assert [decode_fixed_puback(b) for b in bodies] == [PubAck(*a) for a in acks]  # the client's fast path


@settings(max_examples=500)
@given(
    st.binary(min_size=21, max_size=21) | st.builds(lambda b: b"\x94\x04\xcf" + b, st.binary(min_size=18, max_size=18))
)
def test_fixed_puback_decoder_agrees_with_msgpack_or_declines(body: bytes) -> None:
    fast = decode_fixed_puback(body)
    if fast is not None:
        assert decode_frame(body) == fast


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_decoder_on_random_bytes_raises_only_its_own_error_and_stays_bounded(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(64)
    try:
        for chunk in chunks:
            for body in decoder.feed(chunk):
                assert len(body) <= 64
                try:
                    unpack_body(body, 64)
                except RemoteProtocolError as exc:
                    assert exc.code is ErrorCode.MALFORMED_FRAME
            # An incomplete frame never holds more than its header and the limit.
            assert decoder.buffered < 4 + 64
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.FRAME_TOO_LARGE
        assert decoder.buffered == 0
        with pytest.raises(RemoteProtocolError):  # poisoned for good
            decoder.feed(b"")


@pytest.mark.parametrize("size", [LIMIT + 1, 1 << 31, (1 << 32) - 1])
def test_oversized_length_is_refused_before_any_body_byte(size: int) -> None:
    decoder = FrameDecoder(LIMIT)
    assert decoder.feed(struct.pack(">I", size)[:3]) == []
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(struct.pack(">I", size)[3:] + b"x" * 100)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE and str(LIMIT) in str(info.value)
    assert decoder.buffered == 0


def test_a_frame_of_exactly_the_limit_passes() -> None:
    body = msgpack.packb(b"x" * (LIMIT - 3))  # bin16: 3 header bytes
    assert len(body) == LIMIT
    assert FrameDecoder(LIMIT).feed(struct.pack(">I", LIMIT) + body) == [body]


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty body
        b"\xc1",  # never-used msgpack byte
        b"\x91",  # array that claims an element it lacks
        b"\x01\x02",  # two values
        b"\xdd\xff\xff\xff\xff",  # array of 2^32-1 elements
        b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
        b"\x91" * 5000 + b"\x00",  # very deep nesting
        b"\xd4\x01\x00",  # ext type
        b"\xc7\x00\x05",  # an empty ext (max_ext_len=0 let it through)
        b"\x92\x01\xc7\x00\x05",  # one inside an array
        b"\x81\x01\x02",  # non-string map key
    ],
)
def test_unpack_body_turns_every_msgpack_failure_into_malformed_frame(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        unpack_body(body, LIMIT)
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_a_large_body_refuses_an_empty_ext_too() -> None:
    # Past the small-body path (2^20 bytes): the bound unpacker has the ext hook as well.
    body = b"\x92\xc7\x00\x05\xc6" + struct.pack(">I", 1 << 20) + bytes(1 << 20)
    with pytest.raises(RemoteProtocolError, match="ext type 5 is not allowed") as info:
        unpack_body(body, 4 << 20)
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_a_large_body_keeps_the_item_bound() -> None:
    # 2^20 + 1 nils: small per item, but past the array bound of big bodies.
    body = b"\xdd" + struct.pack(">I", (1 << 20) + 1) + b"\xc0" * ((1 << 20) + 1)
    with pytest.raises(RemoteProtocolError) as info:
        unpack_body(body, 4 << 20)
    assert info.value.code is ErrorCode.MALFORMED_FRAME
    assert unpack_body(b"\xdc\x00\x02\xc0\xc0", 4 << 20) == [None, None]


@pytest.mark.parametrize(
    "fields",
    [
        [-1, "Q", "E", None, None, None],
        [True, "Q", "E", None, None, None],
        [1 << 64, "Q", "E", None, None, None],
        [1, "Q", "E", None, {"k": 1}, None],
        [1, "Q", "E", None, [], None],
        [1, "Q", "E", None, None, 7],
        [1, "Q/..", "E", None, None, None],
        [1, "Q", "E\x00", None, None, None],
        [1, b"Q", "E", None, None, None],
    ],
)
def test_publish_fast_path_checks_what_the_constructor_checks(fields: list[object]) -> None:
    good = Publish(0, "Q", "E")  # "Q" and "E" are now known names: the fast path applies
    assert Publish.from_wire([3, 0, "Q", "E", None, None, None]) == good
    with pytest.raises(LocalProtocolError) as constructed:
        Publish(*fields)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError) as decoded:
        Publish.from_wire([3, *fields])
    assert (decoded.value.code, str(decoded.value)) == (constructed.value.code, str(constructed.value))


def test_a_hello_may_leave_out_the_producer_and_a_bad_one_is_refused() -> None:
    assert Hello.from_wire([1, 1, 1, "api", None]) == Hello(1, 1, "api")
    assert Hello.from_wire([1, 1, 1, "api", None, "p-1"]) == Hello(1, 1, "api", None, "p-1")
    for producer in ("", "x" * 65, 7):
        with pytest.raises(LocalProtocolError, match="producer must be nil or a string of 1 to 64"):
            Hello.from_wire([1, 1, 1, "api", None, producer])


@pytest.mark.parametrize(
    "fields",
    [[-1, 0, False], [1, -1, False], [True, 0, False], [1, 1 << 64, False], [1, 0, 0], [1, 0, None], [1, "0", False]],
)
def test_puback_fast_path_checks_what_the_constructor_checks(fields: list[object]) -> None:
    assert PubAck.from_wire([4, 1, 2, True]) == PubAck(1, 2, True)
    with pytest.raises(LocalProtocolError) as constructed:
        PubAck(*fields)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError) as decoded:
        PubAck.from_wire([4, *fields])
    assert (decoded.value.code, str(decoded.value)) == (constructed.value.code, str(constructed.value))
