"""The sans-I/O connection: the state table, handshake limits, hostile frames."""

from __future__ import annotations

import ast
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Connection,
    Err,
    ErrorCode,
    FrameType,
    Hello,
    InvalidRequest,
    Limits,
    LocalProtocolError,
    Ok,
    PayloadTooLarge,
    Ping,
    Pong,
    Publish,
    RemoteProtocolError,
    Role,
    State,
    Subscribe,
    Welcome,
    encode_frame,
)

from .strategies import FRAMES, PAYLOADS, SCALARS


def handshaken() -> tuple[Connection, Connection]:
    """A client and a broker Connection that completed HELLO/WELCOME."""
    client, broker = Connection(Role.CLIENT), Connection(Role.BROKER)
    broker.receive_data(client.send(Hello(1, PROTOCOL_VERSION, "t")))
    assert broker.events() == [Hello(1, PROTOCOL_VERSION, "t")]
    client.receive_data(broker.send(Welcome(1, PROTOCOL_VERSION, "tidings", 1, 1 << 20, 0)))
    assert [type(e) for e in client.events()] == [Welcome]
    assert client.state is broker.state is State.READY
    return client, broker


def test_full_lifecycle() -> None:
    client, broker = handshaken()
    broker.receive_data(client.send(Publish(2, "DB", "CREATE", {"id": 7})))
    assert broker.events() == [Publish(2, "DB", "CREATE", {"id": 7})]
    client.receive_data(broker.send(Ok(2)))
    client.receive_data(broker.send(Ping(9)))
    assert client.events() == [Ok(2), Ping(9)]
    broker.receive_data(client.send(Pong(9)) + client.send(Bye()))
    assert broker.events() == [Pong(9), Bye()]
    assert client.state is broker.state is State.CLOSING
    client.receive_data(broker.send(Ok(3)))  # replies still drain while closing
    assert client.events() == [Ok(3)]


def test_a_ping_sent_before_bye_still_gets_its_pong() -> None:
    """PING and BYE in one read: the broker decodes both (BYE moves it to
    CLOSING) before it answers the PING; the PONG is a reply it owes. Found
    by the session fuzz target: the broker's PONG raised in CLOSING, which
    logged an internal error and lost the PONG."""
    client, broker = handshaken()
    broker.receive_data(client.send(Ping(4)) + client.send(Bye()))
    assert broker.events() == [Ping(4), Bye()]
    client.receive_data(broker.send(Pong(4)))
    assert client.events() == [Pong(4)]
    assert client.state is broker.state is State.CLOSING


def test_a_hello_sent_right_before_bye_still_gets_its_welcome() -> None:
    """A client that says HELLO and BYE in one write (a health check) gets
    its WELCOME; the broker's WELCOME used to raise in CLOSING."""
    client, broker = Connection(Role.CLIENT), Connection(Role.BROKER)
    broker.receive_data(client.send(Hello(1, PROTOCOL_VERSION, "t")) + client.send(Bye()))
    assert broker.events() == [Hello(1, PROTOCOL_VERSION, "t"), Bye()]
    client.receive_data(broker.send(Welcome(1, PROTOCOL_VERSION, "tidings", 1, 1 << 20, 0)))
    assert [type(e) for e in client.events()] == [Welcome]
    assert client.state is broker.state is State.CLOSING


@pytest.mark.parametrize("spliced", [False, True])
def test_nothing_after_the_peers_bye_is_read(spliced: bool) -> None:
    """Rule 3: the sender of BYE sends nothing more, so its receiver decodes
    nothing after it: not a second BYE (which moved the broker to CLOSED,
    where the WELCOME it still owed could not be sent: found by the session
    fuzz target), not garbage, not a later read."""
    client, broker = Connection(Role.CLIENT), Connection(Role.BROKER)
    hello = client.send(Hello(1, PROTOCOL_VERSION, "t"))
    bye = encode_frame(Bye().to_wire())
    broker.receive_data(hello + bye + bye + b"\x00\x00\x00\x01\xc1" + encode_frame(Ping(5).to_wire()))
    events = broker.events_spliced() if spliced else broker.events()
    assert events == [Hello(1, PROTOCOL_VERSION, "t"), Bye()]
    assert broker.state is State.CLOSING and broker.failed is None
    broker.send(Welcome(1, PROTOCOL_VERSION, "tidings", 1, 1 << 20, 0))  # the reply it owes
    broker.receive_data(encode_frame(Ping(6).to_wire()))
    assert (broker.events_spliced() if spliced else broker.events()) == []


@pytest.mark.parametrize("spliced", [False, True])
@pytest.mark.parametrize("name", [[81], {"a": 1}])
def test_an_unhashable_name_in_a_publish_is_a_malformed_frame(spliced: bool, name: object) -> None:
    """PUBLISH's fast path looked the queue and event up in its name caches
    before checking they were strings: a list or a map raised TypeError out
    of the decoder (the broker answered INTERNAL). Found by the decoder fuzz
    target."""
    from protocol import FrameType, RemoteProtocolError

    for queue, event in ((name, "e"), ("Q", name)):
        client, broker = handshaken()
        data = client.send(Publish(2, "Q", "e", b"x"))  # the names are known from here on
        broker.receive_data(data + encode_frame([int(FrameType.PUBLISH), 3, queue, event, b"", None, None]))
        with pytest.raises(RemoteProtocolError) as info:
            broker.events_spliced() if spliced else broker.events()
        assert info.value.code is ErrorCode.MALFORMED_FRAME
        assert "name must be a string" in str(info.value)


def test_client_may_not_send_before_hello() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError) as info:
        client.send(Publish(1, "DB", "CREATE"))
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    assert client.state is State.HANDSHAKE  # our own mistake changes nothing


def test_broker_refuses_requests_before_hello() -> None:
    broker = Connection(Role.BROKER)
    broker.receive_data(encode_frame(Publish(1, "DB", "CREATE").to_wire()))
    with pytest.raises(RemoteProtocolError) as info:
        broker.events()
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME and "PUBLISH" in str(info.value)
    assert broker.failed is info.value and info.value.before == []
    with pytest.raises(RemoteProtocolError):
        broker.events()
    broker.send_error(0, info.value.code, str(info.value))
    assert broker.state is State.ERROR


def test_nothing_but_welcome_err_or_bye_while_greeting() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello(1, PROTOCOL_VERSION, "t"))
    with pytest.raises(LocalProtocolError):
        client.send(Publish(2, "DB", "CREATE"))
    client.receive_data(encode_frame(Err(1, int(ErrorCode.AUTH_FAILED), "no").to_wire()))
    assert client.events() == [Err(1, int(ErrorCode.AUTH_FAILED), "no")]


@pytest.mark.parametrize("frame", [Ok(1), Welcome(1, 1, "x", 1, 1 << 20, 0)])
def test_client_cannot_send_broker_frames(frame: Any) -> None:
    client, _ = handshaken()
    with pytest.raises(LocalProtocolError):
        client.send(frame)


def test_broker_refuses_a_broker_frame_from_a_client() -> None:
    _, broker = handshaken()
    broker.receive_data(encode_frame(Ok(5).to_wire()))
    with pytest.raises(RemoteProtocolError) as info:
        broker.events()
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME


def test_handshake_frames_are_capped_small_then_the_limit_lifts() -> None:
    limits = Limits(max_frame_size=1 << 16, handshake_frame_size=256)
    broker = Connection(Role.BROKER, limits=limits)
    broker.receive_data(struct.pack(">I", 257))
    with pytest.raises(RemoteProtocolError) as info:
        broker.events()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    client, broker = Connection(Role.CLIENT, limits=limits), Connection(Role.BROKER, limits=limits)
    broker.receive_data(client.send(Hello(1, PROTOCOL_VERSION, "t")))
    broker.events()
    broker.send(Welcome(1, PROTOCOL_VERSION, "tidings", 1, 1 << 16, 0))
    big = Publish(2, "DB", "CREATE", "x" * 10_000)
    broker.receive_data(encode_frame(big.to_wire()))
    assert broker.events() == [big]


def test_send_refuses_a_frame_over_the_limit() -> None:
    client, _ = handshaken()
    client.adopt_max_frame_size(100)
    with pytest.raises(PayloadTooLarge) as info:  # a PUBLISH: the message is too large
        client.send(Publish(2, "DB", "CREATE", "x" * 200))
    assert isinstance(info.value, LocalProtocolError) and info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(LocalProtocolError) as other:
        client.send(Subscribe(3, 1, "DB", tuple(f"event-{i}" for i in range(20))))
    assert other.value.code is ErrorCode.FRAME_TOO_LARGE and not isinstance(other.value, PayloadTooLarge)
    assert client.state is State.READY


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        ([int(FrameType.PUBLISH), 5, "../etc", "CREATE", None, None, None], ErrorCode.INVALID_NAME),
        ([int(FrameType.PUBLISH), 5, "DB", "", None, None, None], ErrorCode.INVALID_NAME),
        ([int(FrameType.SUBSCRIBE), 5, 1, "DB", [], None, "new", None, 0, 0, 0, None], ErrorCode.BAD_REQUEST),
        ([int(FrameType.SUBSCRIBE), 5, 1, "DB", [], None, "later", None, 10, 0, 0, None], ErrorCode.BAD_REQUEST),
        ([int(FrameType.ACK), 5, "DB", "d", [], -1], ErrorCode.BAD_REQUEST),
    ],
)
def test_a_bad_value_is_a_request_error_not_a_dead_connection(wire: list[Any], code: ErrorCode) -> None:
    _, broker = handshaken()
    broker.receive_data(encode_frame(wire))
    (event,) = broker.events()
    assert isinstance(event, InvalidRequest) and event.req == 5 and event.code is code
    assert broker.state is State.READY


@pytest.mark.parametrize(
    "wire",
    [
        [],  # no type
        ["PUBLISH"],  # type not an int
        [99, 1],  # unknown type
        [int(FrameType.PUBLISH), 1, "DB"],  # too few fields
        [int(FrameType.PUBLISH), 1, 7, "CREATE", None, None, None],  # queue not a string
        [int(FrameType.ACK), 1, "DB", "d", "not-a-list", None],
        {"type": 3},  # not an array
    ],
)
def test_a_bad_shape_is_malformed_frame(wire: Any) -> None:
    _, broker = handshaken()
    broker.receive_data(encode_frame(wire))
    with pytest.raises(RemoteProtocolError) as info:
        broker.events()
    assert info.value.code is ErrorCode.MALFORMED_FRAME
    assert broker.failed is info.value


def test_send_error_works_in_every_state() -> None:
    broker = Connection(Role.BROKER)
    broker.receive_data(b"\x00\x00\x00\x01\xc1")
    with pytest.raises(RemoteProtocolError):
        broker.events()
    wire = broker.send_error(0, ErrorCode.MALFORMED_FRAME, "x" * 5000)
    client = Connection(Role.CLIENT)
    client.receive_data(wire)
    (err,) = client.events()
    assert isinstance(err, Err) and err.code == ErrorCode.MALFORMED_FRAME and len(err.message) == 1024


def test_ack_offsets_normalise_to_a_tuple() -> None:
    _, broker = handshaken()
    broker.receive_data(encode_frame([int(FrameType.ACK), 3, "DB", "d", [1, 2], None]))
    assert broker.events() == [Ack(3, "DB", "d", (1, 2))]


def test_subscribe_defaults() -> None:
    s = Subscribe(1, 1, "DB")
    assert (s.events, s.durable, s.start, s.prefetch) == ((), None, "new", 100)


# --- hostile input ----------------------------------------------------------------


@settings(max_examples=1000)
@given(st.lists(st.binary(max_size=40), max_size=10), st.booleans())
def test_random_bytes_raise_only_remote_protocol_errors(chunks: list[bytes], ready: bool) -> None:
    broker = handshaken()[1] if ready else Connection(Role.BROKER)
    try:
        for chunk in chunks:
            broker.receive_data(chunk)
            for event in broker.events():
                assert event is not None
    except RemoteProtocolError as exc:
        assert exc.code in (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNEXPECTED_FRAME)
        assert broker.failed is not None


@settings(max_examples=300)
@given(st.lists(FRAMES, max_size=4), st.binary(max_size=30))
def test_what_came_before_the_bad_bytes_is_in_the_error(frames: list[Any], garbage: bytes) -> None:
    """Fed at once, the events before a violation come with the error, exactly
    those a byte-at-a-time feed returns before it fails the same way."""
    wire = b"".join(encode_frame(f.to_wire()) for f in frames) + garbage
    whole, slow = handshaken()[1], handshaken()[1]
    whole.receive_data(wire)
    try:
        events = whole.events()
    except RemoteProtocolError as exc:
        events, error = exc.before, exc
    else:
        error = None
    got: list[Any] = []
    slow_error = None
    for i in range(len(wire)):
        slow.receive_data(wire[i : i + 1])
        try:
            got += slow.events()
        except RemoteProtocolError as exc:
            got += exc.before
            slow_error = exc
            break
    assert events == got
    assert (error is None) == (slow_error is None)
    if error is not None and slow_error is not None:
        assert (error.code, str(error)) == (slow_error.code, str(slow_error))


WIRE_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), PAYLOADS)


@settings(max_examples=1000)
@given(st.integers(-2, 25), st.lists(WIRE_VALUES, max_size=13))
def test_structure_aware_bad_frames_never_escape_as_other_errors(frame_type: int, fields: list[Any]) -> None:
    _, broker = handshaken()
    broker.receive_data(encode_frame([frame_type, *fields]))
    try:
        events = broker.events()
    except RemoteProtocolError:
        assert broker.failed is not None
        return
    assert len(events) == 1 and broker.state in (State.READY, State.CLOSING)


@given(FRAMES)
def test_every_client_frame_the_table_allows_decodes_on_the_broker(frame: Any) -> None:
    client, broker = handshaken()
    try:
        wire = client.send(frame)
    except LocalProtocolError:
        return  # not a client frame in READY
    broker.receive_data(wire)
    assert broker.events() == [frame]


def test_protocol_package_does_no_io() -> None:
    """protocol/ is sans-I/O: it may import only pure modules and msgpack."""
    allowed = {
        "__future__",
        "enum",
        "dataclasses",
        "typing",
        "struct",
        "re",
        "collections",
        "functools",
        "operator",
        "msgpack",
    }
    root = Path(__file__).resolve().parents[2] / "protocol"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_msgpack_bin_and_str_stay_distinct() -> None:
    body = msgpack.packb([int(FrameType.PUBLISH), 1, "DB", "E", b"raw", None, None], use_bin_type=True)
    _, broker = handshaken()
    broker.receive_data(struct.pack(">I", len(body)) + body)
    (event,) = broker.events()
    assert isinstance(event, Publish) and event.payload == b"raw"
