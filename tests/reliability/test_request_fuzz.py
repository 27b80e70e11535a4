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
import fnmatch
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import Client
from protocol import (
    Ack,
    Batch,
    Delete,
    Err,
    ErrorCode,
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
from tests.helpers import RawPeer, running_broker, url_of
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


# --- the same requests from a user with limited rights (RELIABILITY.md A3, A4) ----------

_RIGHTS = st.lists(st.sampled_from(["Q0", "Q1", "Q*", "Q1.dead", "DLQ"]), max_size=3, unique=True)
#: What a request that lacks its right may get instead of PERMISSION_DENIED:
#: a value refused while decoding, or a sub_id in use (both checked first).
_CHECKED_FIRST = {ErrorCode.BAD_REQUEST, ErrorCode.INVALID_NAME, ErrorCode.DUPLICATE_SUBSCRIPTION}


def _allowed(patterns: list[str], queue: str) -> bool:
    return any(fnmatch.fnmatchcase(queue, p) for p in patterns)


def _denial(wire: list[Any], rights: dict[str, Any]) -> tuple[bool, bool]:
    """(must be refused, may be refused) for a request, from the user's
    rights alone. A durable SUBSCRIBE that sets max_deliveries without naming
    its dead-letter queue writes to the one its durable already has, if any:
    that depends on history, so it only *may* be refused."""
    kind = FrameType(wire[0])
    publish, subscribe, delete = rights["publish"], rights["subscribe"], rights["delete"]
    if kind is FrameType.PUBLISH:
        must = not _allowed(publish, wire[2])
        return must, must
    if kind is FrameType.SUBSCRIBE:
        queue, durable, max_deliveries, dead_letter = wire[3], wire[5], wire[10], wire[11]
        must = not _allowed(subscribe, queue) or (
            durable is not None and dead_letter is not None and not _allowed(publish, dead_letter)
        )
        return must, must or (durable is not None and max_deliveries != 0 and dead_letter is None)
    if kind in (FrameType.ACK, FrameType.NACK, FrameType.PROGRESS, FrameType.SEEK, FrameType.FETCH):
        must = not _allowed(subscribe, wire[2])
        return must, must
    if kind is FrameType.DELETE:
        must = not _allowed(delete, wire[2])
        return must, must
    if kind is FrameType.STATUS:
        return not rights["status"], not rights["status"]
    return False, False  # UNSUBSCRIBE, PING


async def _exchange_as_user(data_dir: Path, requests: list[list[Any]], rights: dict[str, Any]) -> None:
    lines = [f"{key} = {json.dumps(value)}" for key, value in rights.items()]
    users = data_dir / "users.toml"
    users.write_text(
        '[users.admin]\ntoken = "admin-token"\npublish = ["*"]\nsubscribe = ["*"]\ndelete = ["*"]\nstatus = true\n'
        '[users.u]\ntoken = "user-token"\n' + "\n".join(lines) + "\n"
    )
    limits = Limits(max_frame_size=700, handshake_frame_size=700)
    async with running_broker(data_dir / "data", limits=limits, users_file=users) as broker:
        peer = await RawPeer.connect(broker, token="user-token")
        reqs = {}
        for req, wire in enumerate(requests, start=2):
            reqs[req] = wire
            peer.send_wire([wire[0], req, *wire[2:]])
        stored: dict[str, list[int]] = {"Q0": [], "Q1": []}  # offsets of new records, in order of PUBACK
        async with asyncio.timeout(10):
            answered = 0
            while answered < len(reqs):
                reply = await peer.recv()
                if not isinstance(reply, ANSWERS):
                    continue  # DELIVER
                answered += 1
                wire = reqs[reply.req]
                must, may = _denial(wire, rights)
                denied = isinstance(reply, Err) and reply.code == ErrorCode.PERMISSION_DENIED
                what = f"{FrameType(wire[0]).name} {wire[2:]} with {rights}: {reply}"
                assert not denied or may, f"refused though allowed: {what}"
                assert not must or (isinstance(reply, Err) and (denied or reply.code in _CHECKED_FIRST)), (
                    f"served though not allowed: {what}"
                )
                if isinstance(reply, PubAck) and not reply.duplicate:
                    stored[wire[2]].append(reply.offset)
        peer.close()
        async with Client(url_of(broker), token="admin-token") as admin:
            status = await admin.status()
    queues = {q["name"]: q for q in status["queues"]}
    durables = {d["queue"] for d in status["durables"]}
    for name in ("Q0", "Q1"):
        may = {right for right in ("publish", "subscribe", "delete") if _allowed(rights[right], name)}
        if "publish" not in may:
            assert stored[name] == [] and queues.get(name, {"next_offset": 0})["next_offset"] == 0
        if not may & {"publish", "subscribe"}:
            assert name not in queues and not (data_dir / "data" / "queues" / name).exists()
        if "subscribe" not in may:
            assert name not in durables
        if "delete" not in may:  # never emptied: new records only ever further on
            assert stored[name] == sorted(set(stored[name]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries({"publish": _RIGHTS, "subscribe": _RIGHTS, "delete": _RIGHTS, "status": st.booleans()}),
    st.lists(REQUESTS, min_size=5, max_size=30),
)
def test_every_request_is_checked_against_the_users_rights(rights: dict[str, Any], requests: list[list[Any]]) -> None:
    """Every entry point, with any values and in any order, for a user with
    any rights over two queues: a request is refused (PERMISSION_DENIED) only
    when it lacks its right, and always then (unless a value was refused
    first); a queue the user may not publish to gets no record, one it may
    not touch is never created, one it may not consume from gets no durable,
    and one it may not delete is never emptied. Nothing is logged."""
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_exchange_as_user(Path(tmp), requests, rights))
    finally:
        logging.getLogger().removeHandler(errors)
    assert not errors.records, [r.getMessage() + (f"\n{r.exc_text}" if r.exc_text else "") for r in errors.records]
