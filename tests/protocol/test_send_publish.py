"""Connection.send_publish: the client's PUBLISH fast path equals send(Publish(...))."""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    Connection,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    PayloadTooLarge,
    Publish,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
)
from protocol.framing import unpack_body

from .strategies import PAYLOADS, SCALARS
from .test_connection import handshaken


@given(req=st.integers(0, (1 << 64) - 1), payload=PAYLOADS, message_id=st.none() | st.text(min_size=1, max_size=20))
def test_send_publish_encodes_exactly_what_send_does(req: int, payload: Any, message_id: str | None) -> None:
    client, broker = handshaken()
    fast = client.send_publish(req, "DB", "CREATE", payload, message_id)
    assert fast == client.send(Publish(req, "DB", "CREATE", payload, None, message_id))
    broker.receive_data(fast)
    assert broker.events() == [Publish(req, "DB", "CREATE", payload, None, message_id)]
    assert client.state is State.READY


def test_send_publish_outside_ready_takes_the_general_path() -> None:
    conn = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="cannot send PUBLISH in state HANDSHAKE"):
        conn.send_publish(1, "DB", "CREATE", 1)
    _, broker = handshaken()
    with pytest.raises(LocalProtocolError, match="cannot send PUBLISH"):
        broker.send_publish(1, "DB", "CREATE", 1)


def test_unencodable_payload_is_a_local_protocol_error_on_both_paths() -> None:
    client, _ = handshaken()
    for send in (lambda: client.send_publish(1, "DB", "CREATE", object()),
                 lambda: client.send(Publish(1, "DB", "CREATE", object()))):  # fmt: skip
        with pytest.raises(LocalProtocolError, match="PUBLISH frame cannot be encoded as msgpack") as info:
            send()
        assert isinstance(info.value.__cause__, TypeError)
    assert client.state is State.READY


def test_send_publish_checks_the_frame_limit() -> None:
    client, _ = handshaken()
    client.adopt_max_frame_size(64)
    with pytest.raises(
        PayloadTooLarge, match=r"message of \d+ bytes \(its PUBLISH frame\) exceeds the frame limit of 64 bytes"
    ) as info:
        client.send_publish(1, "DB", "CREATE", b"x" * 100)
    assert isinstance(info.value, LocalProtocolError) and info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_send_again_checks_state_and_the_current_limit() -> None:
    client, broker = handshaken()
    data = client.send_publish(5, "DB", "CREATE", b"x" * 200)
    fresh, _ = handshaken()
    assert fresh.send_again(data, Publish.TYPE) is data  # a new connection sends the same bytes
    broker.receive_data(data)
    assert broker.events() == [Publish(5, "DB", "CREATE", b"x" * 200)]
    fresh.adopt_max_frame_size(64)
    with pytest.raises(PayloadTooLarge) as info:
        fresh.send_again(data, Publish.TYPE)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(LocalProtocolError, match="cannot send PUBLISH in state HANDSHAKE"):
        Connection(Role.CLIENT).send_again(data, Publish.TYPE)


# Map keys of every kind msgpack packs: unpack_body takes only str and bin ones.
ANY_KEYS = (
    st.text(max_size=4) | st.binary(max_size=4) | st.integers(-3, 300) | st.booleans() | st.none()
    | st.floats(allow_nan=False) | st.tuples(st.integers(0, 3))
)  # fmt: skip
LOOSE_PAYLOADS: st.SearchStrategy[Any] = st.recursive(
    SCALARS | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner) | st.dictionaries(ANY_KEYS, inner, max_size=4),
    max_leaves=12,
)


@given(payload=LOOSE_PAYLOADS)
def test_a_payload_is_refused_before_sending_exactly_when_the_broker_could_not_decode_it(payload: Any) -> None:
    """msgpack packs a dict with an int key (say) or an ExtType without
    complaint, but the broker's decoder (strict_map_key, no ext types)
    refuses them as MALFORMED_FRAME and closes the connection: both send
    paths refuse such a payload first, and only such a payload; the state is
    unchanged. (They sent it.)"""
    raw = encode_frame([int(FrameType.PUBLISH), 1, "DB", "CREATE", payload, None, None])
    try:
        unpack_body(raw[4:], 1 << 20)
        decodable = True
    except RemoteProtocolError:
        decodable = False
    client, broker = handshaken()
    for send in (lambda: client.send_publish(1, "DB", "CREATE", payload),
                 lambda: client.send(Publish(1, "DB", "CREATE", payload))):  # fmt: skip
        if decodable:
            broker.receive_data(send())
            assert [type(e) for e in broker.events()] == [Publish]
        else:
            with pytest.raises(LocalProtocolError, match=r"PUBLISH frame cannot be sent: "):
                send()
        assert client.state is State.READY


def test_a_refused_map_key_is_named_with_where_it_is() -> None:
    client, _ = handshaken()
    cases = [
        ({"http": {200: "ok"}}, "payload['http'] has the key 200 (int)"),
        ([1, {"a": [{"ok": 1}, {None: 2}]}], "payload[1]['a'][1] has the key None (NoneType)"),
        ({(1, 2): "pair"}, "payload has the key (1, 2) (tuple)"),
    ]
    prefix = "map keys must be strings (or bytes): "
    cases = [(payload, prefix + where) for payload, where in cases]
    cases.append(([msgpack.ExtType(5, b"x")], "the peer would refuse it: frame body is not one valid msgpack value: "
                                              "ValueError: ext type 5 is not allowed"))  # fmt: skip
    for payload, where in cases:
        with pytest.raises(LocalProtocolError) as info:
            client.send_publish(1, "DB", "CREATE", payload)
        assert str(info.value) == f"PUBLISH frame cannot be sent: {where}"
        assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_a_payload_nested_deeper_than_the_stack_is_still_checked() -> None:
    """Neither the check nor the search for the key it names recurses in
    Python: a payload nested deeper than the interpreter's recursion limit
    allows (msgpack packs up to 511 levels) is refused all the same."""
    client, _ = handshaken()
    payload: Any = {1: "deep"}
    for _ in range(400):
        payload = [payload]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        with pytest.raises(LocalProtocolError, match=r"\[0\] has the key 1 \(int\)$"):
            client.send_publish(1, "DB", "CREATE", payload)
    finally:
        sys.setrecursionlimit(limit)
