"""A stored record's headers, found and extended without decoding its payload:
the same bytes as re-encoding the whole record would give."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from broker.queue import _record_headers, with_header
from protocol import encode_record
from protocol.wire import record_headers_at
from tests.protocol.strategies import EVENTS, HEADERS, PAYLOADS

TIMESTAMPS = st.integers(0, (1 << 64) - 1) | st.integers(-(1 << 63), -1)


@given(event=EVENTS, ts=TIMESTAMPS, headers=HEADERS, payload=PAYLOADS, name=st.text(max_size=20), value=st.text())
def test_with_header_is_the_record_encoded_with_that_header(
    event: str, ts: int, headers: dict[str, str] | None, payload: Any, name: str, value: str
) -> None:
    body = encode_record(event, ts, headers, payload)
    assert with_header(body, name, value) == encode_record(event, ts, {**(headers or {}), name: value}, payload)
    assert _record_headers(body) == headers
    # The headers start after the event and the timestamp, each packed alone.
    assert record_headers_at(body) == len(msgpack.packb(event)) + len(msgpack.packb(ts))
