"""A client's PUBACK runs (``Connection(puback_runs=True)``): the same frames, faster.

The property: whatever bytes arrive, cut wherever, a client connection with
runs returns what one without returns once each run is spelled out as its
PubAcks, and fails the same way.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    PROTOCOL_VERSION,
    Connection,
    Deliver,
    Err,
    Hello,
    Ok,
    Ping,
    PubAck,
    PubAckRun,
    RemoteProtocolError,
    Role,
    State,
    Welcome,
    encode_frame,
    encode_pubacks,
)
from protocol.wire import puback_run_length

from .strategies import EVENTS, HEADERS, PAYLOADS, REQ, U64


def ready_client(runs: bool) -> Connection:
    client, broker = Connection(Role.CLIENT, puback_runs=runs), Connection(Role.BROKER)
    broker.receive_data(client.send(Hello(1, PROTOCOL_VERSION, "t")))
    broker.events()
    client.receive_data(broker.send(Welcome(1, PROTOCOL_VERSION, "tidings", 1, 1 << 20, 0)))
    client.events()
    assert client.state is State.READY
    return client


def spelled_out(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if type(event) is PubAckRun:
            assert len(event) > 0
            out += [PubAck(req, offset, dup == 0xC3) for req, offset, dup in event]
        else:
            out.append(event)
    return out


def outcome(runs: bool, chunks: list[bytes]) -> tuple[list[Any], str | None, State]:
    client = ready_client(runs)
    events: list[Any] = []
    try:
        for chunk in chunks:
            client.receive_data(chunk)
            events += client.events()
    except RemoteProtocolError as exc:
        return spelled_out(events), f"{exc.code}: {exc}", client.state
    return spelled_out(events), None, client.state


# Pieces of a broker's stream: runs of fixed-width PUBACKs, PUBACKs in other
# integer widths (the general path), other broker frames, and stray bytes.
FIXED_ACKS = st.lists(st.tuples(REQ, U64, st.booleans()), min_size=1, max_size=6).map(encode_pubacks)
PIECES = st.one_of(
    FIXED_ACKS,
    FIXED_ACKS,
    st.builds(PubAck, REQ, U64, st.booleans()).map(lambda f: encode_frame(f.to_wire())),
    st.builds(Deliver, REQ, U64, U64, EVENTS, U64, HEADERS, PAYLOADS).map(lambda f: encode_frame(f.to_wire())),
    st.builds(Ok, REQ).map(lambda f: encode_frame(f.to_wire())),
    st.builds(Ping, REQ).map(lambda f: encode_frame(f.to_wire())),
    st.builds(Err, REQ, st.sampled_from([1, 26, 40]), st.text(max_size=10)).map(lambda f: encode_frame(f.to_wire())),
    st.binary(min_size=1, max_size=30),
)


@settings(max_examples=500)
@given(st.lists(PIECES, max_size=8), st.data())
def test_runs_spell_out_to_what_the_general_path_returns(pieces: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(pieces)
    # Mutate a few bytes: near-PUBACKs must leave the run and meet the general path's checks.
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, len(wire) - 1)), st.integers(0, 255)), max_size=2))
    buf = bytearray(wire)
    for pos, value in flips:
        if buf:
            buf[pos] = value
    wire = bytes(buf)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert outcome(True, chunks) == outcome(False, chunks)


def test_a_run_is_one_event_across_reads_cut_inside_a_frame() -> None:
    acks = [(req, req * 10, req % 7 == 0) for req in range(1, 1001)]
    wire = encode_pubacks(acks)
    client = ready_client(True)
    events: list[Any] = []
    for start in range(0, len(wire), 4096):  # 4096 is not a multiple of 25
        client.receive_data(wire[start : start + 4096])
        events += client.events()
    assert all(type(e) is PubAckRun for e in events)
    assert len(events) == -(-len(wire) // 4096)  # one run per read: the cut frame is carried over
    assert spelled_out(events) == [PubAck(*a) for a in acks]
    assert client.state is State.READY


def test_run_length_stops_before_the_first_frame_that_differs() -> None:
    wire = encode_pubacks([(r, r, False) for r in range(1, 6)])
    assert puback_run_length(wire) == 5
    assert puback_run_length(wire[:-1]) == 4  # the cut last frame is not whole
    assert puback_run_length(wire[1:]) == 0  # not at a frame boundary
    for pos in (0, 3, 4, 5, 6, 15, 24):  # every fixed byte of the third frame
        bad = bytearray(wire)
        bad[50 + pos] ^= 0x10  # (0x01 would turn false into true)
        assert puback_run_length(bytes(bad)) == 2, pos
    for pos in (0, 3, 4, 5, 6, 15, 24):  # and of a lone frame
        bad = bytearray(wire[:25])
        bad[pos] ^= 0x10
        assert puback_run_length(bytes(bad)) == 0, pos
    assert puback_run_length(wire[:25]) == 1
    other = encode_frame(Ok(7).to_wire())
    assert puback_run_length(wire[:50] + other + wire[50:]) == 2
    assert puback_run_length(other + wire) == 0


def test_runs_only_in_ready() -> None:
    """Before WELCOME a PUBACK is a protocol error, run or not."""
    client = Connection(Role.CLIENT, puback_runs=True)
    client.send(Hello(1, PROTOCOL_VERSION, "t"))
    client.receive_data(encode_pubacks([(1, 0, False)]))
    try:
        client.events()
    except RemoteProtocolError:
        assert client.failed is not None
    else:
        raise AssertionError("a PUBACK before WELCOME was accepted")


@pytest.mark.parametrize("frames", [1, 3])  # a lone frame (a window-1 read) has its own check
def test_every_single_byte_change_of_a_frame_inside_a_run_is_judged_as_the_general_path_does(frames: int) -> None:
    wire = encode_pubacks([(r, r + 100, False) for r in range(1, frames + 1)])
    middle = 25 * (frames // 2)
    for pos in range(middle, middle + 25):  # each byte of the middle frame
        for value in range(256):
            bad = bytearray(wire)
            bad[pos] = value
            chunks = [bytes(bad)]
            assert outcome(True, chunks) == outcome(False, chunks), (pos, value)
