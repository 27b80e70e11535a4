"""Well-formed requests in any order and with any values: every one is
answered, the connection stays, and the broker logs no error (R9).

The hostile tests send frames of the wrong shape; this one sends requests of
the right shape and types with arbitrary values (out-of-range ones too, which
must get BAD_REQUEST), over a few names so that they meet: subscribe,
publish, ack what was never delivered, nack with a delay of years, seek a
durable that has consumers, delete the queue under a subscription, fetch,
STATUS, all interleaved on one connection. A handler that raises on some
combination (as STATUS did when its reply outgrew the frame limit) would
drop the connection with a traceback in the log; here that is a failure,
shrunk to the shortest sequence.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    Ack,
    Batch,
    Delete,
    Err,
    Fetch,
    Frame,
    FrameType,
    Limits,
    Nack,
    Ok,
    Ping,
    Pong,
    Progress,
    PubAck,
    Publish,
    Seek,
    Status,
    StatusReply,
    Subscribe,
    Unsubscribe,
)
from tests.helpers import RawPeer, running_broker
from tests.protocol.strategies import PAYLOADS

QUEUES = st.sampled_from(["Q0", "Q1"])
DURABLES = st.sampled_from(["d0", "d1"])
PATTERNS = st.lists(st.sampled_from(["E", "F", "F*", "*"]), max_size=2).map(tuple)
SMALL = st.integers(0, 6)
BIG = st.integers(0, (1 << 64) - 1)
OFFSETS = st.lists(SMALL | BIG, max_size=4).map(tuple)
DELAYS = st.integers(0, 50) | st.integers(0, 1 << 40)
HEADERS = st.none() | st.dictionaries(st.sampled_from(["h", "x-retention-gap", "x-producer-seq"]), st.text(max_size=8))


@st.composite
def _starts(draw: st.DrawFn) -> tuple[str, int | None]:
    kind = draw(st.sampled_from(["new", "earliest", "offset", "time"]))
    return kind, (draw(SMALL | BIG) if kind in ("offset", "time") else None)


def _wire(cls: type[Frame], *fields: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """``[TYPE, req, *fields]`` of ``cls``, unchecked: values the broker must refuse come too."""
    return st.tuples(*fields).map(lambda values: [int(cls.TYPE), 0, *values])


def _with_start(
    cls: type[Frame], before: list[st.SearchStrategy[Any]], after: list[st.SearchStrategy[Any]]
) -> st.SearchStrategy[list[Any]]:
    """:func:`_wire` with a start kind and its value between ``before`` and ``after``."""
    return _starts().flatmap(lambda s: _wire(cls, *before, st.just(s[0]), st.just(s[1]), *after))


_SUBSCRIBE_TAIL = [st.integers(0, 4) | BIG, DELAYS, st.integers(0, 3) | BIG, st.none() | st.sampled_from(["Q1", "DLQ"])]
REQUESTS: st.SearchStrategy[list[Any]] = st.one_of(
    _wire(Publish, QUEUES, st.sampled_from(["E", "F1"]), PAYLOADS, HEADERS, st.none() | st.sampled_from(["m1", "m2"])),
    _with_start(Subscribe, [st.integers(1, 3), QUEUES, PATTERNS, st.none() | DURABLES], _SUBSCRIBE_TAIL),
    _wire(Unsubscribe, st.integers(1, 3)),
    _wire(Ack, QUEUES, DURABLES, OFFSETS, st.none() | SMALL | BIG),
    _wire(Nack, QUEUES, DURABLES, OFFSETS, DELAYS),
    _wire(Progress, QUEUES, DURABLES, OFFSETS),
    _wire(Delete, QUEUES, st.none() | DURABLES),
    _with_start(Seek, [QUEUES, DURABLES], []),
    # wait_ms 0: a long poll would be answered after the run ends.
    _with_start(Fetch, [QUEUES, st.none() | DURABLES, PATTERNS, st.integers(0, 5) | BIG, st.just(0)], [DELAYS]),
    _wire(Status),
    _wire(Ping),
)
ANSWERS = (PubAck, Ok, Err, Batch, StatusReply, Pong)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _exchange(data_dir: Path, requests: list[list[Any]]) -> None:
    # A small frame limit: STATUS needs pages, payloads meet PAYLOAD_TOO_LARGE.
    limits = Limits(max_frame_size=700, handshake_frame_size=700)
    async with running_broker(data_dir, limits=limits) as broker:
        peer = await RawPeer.connect(broker)
        reqs = {}
        for req, wire in enumerate(requests, start=2):
            reqs[req] = FrameType(wire[0]).name
            peer.send_wire([wire[0], req, *wire[2:]])
        answered: dict[int, Frame] = {}
        async with asyncio.timeout(10):
            while len(answered) < len(reqs):
                reply = await peer.recv()  # raises if the broker hung up
                if not isinstance(reply, ANSWERS):
                    continue  # DELIVER
                assert reply.req in reqs, f"an answer to no request: {reply}"
                assert reply.req not in answered, f"{reqs[reply.req]} answered twice: {reply}"
                answered[reply.req] = reply
        peer.send_frame(Ping(1))
        async with asyncio.timeout(10):
            while not isinstance(reply := await peer.recv(), Pong):
                pass
        peer.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(REQUESTS, min_size=5, max_size=40))
def test_any_valid_requests_are_each_answered_and_nothing_is_logged(requests: list[list[Any]]) -> None:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_exchange(Path(tmp), requests))
    finally:
        logging.getLogger().removeHandler(errors)
    assert not errors.records, [r.getMessage() + (f"\n{r.exc_text}" if r.exc_text else "") for r in errors.records]
