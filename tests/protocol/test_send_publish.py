"""Connection.send_publish: the client's PUBLISH fast path equals send(Publish(...))."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import Connection, ErrorCode, LocalProtocolError, PayloadTooLarge, Publish, Role, State

from .strategies import PAYLOADS
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
