"""Seed inputs for the fuzz targets: valid sessions and logs to mutate from.

Built from the real encoder and the real log, so they follow the protocol
and the record format as they are now.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from broker.log import QueueLog
from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Delete,
    Fetch,
    Frame,
    Hello,
    Nack,
    Ping,
    Progress,
    Publish,
    Seek,
    Status,
    Subscribe,
    Unsubscribe,
    encode_frame,
)
from tests.fuzz.targets import PRODUCER, RAW, SPLICED


def _session(*frames: Frame, first: int = 63) -> bytes:
    """The first byte (see ``targets._chunks``: 63 = 64-byte reads), then the frames."""
    return bytes([first]) + b"".join(encode_frame(f.to_wire()) for f in frames)


def _hello(producer: str | None = None, token: str | None = None) -> Hello:
    return Hello(1, PROTOCOL_VERSION, "fuzz", None if token is None else {"token": token}, producer)


def _requests() -> list[Frame]:
    """One of every request, on one queue, in an order where each does something."""
    return [
        Publish(2, "Q", "created", b"x" * 20),
        Publish(3, "Q", "updated", {"id": 7}, {"h": "v"}, "m1"),
        Subscribe(4, 1, "Q", ("created", "up*"), "d", "earliest", None, 10, 1000, 2, "Q.dead"),
        Fetch(5, "Q", None, (), 10, 0, "offset", 0),
        Fetch(6, "Q", "puller", ("*",), 5, 0, "earliest"),
        Ack(7, "Q", "d", (0,), None),
        Nack(8, "Q", "d", (1,), 0),
        Progress(9, "Q", "d", (1,)),
        Unsubscribe(10, 1),
        Seek(11, "Q", "d", "offset", 1),
        Status(12),
        Ping(13),
        Delete(14, "Q", "puller"),
        Delete(15, "Q"),
        Bye(),
    ]


def decoder_seeds() -> list[bytes]:
    """Whole connections from the first byte on, for the ``decoder`` target."""
    return [
        _session(_hello("p1")),
        _session(_hello("p1"), *_requests()),
        _session(_hello("p1"), *_requests(), first=SPLICED | 63),  # the broker's way of decoding
        _session(_hello(), *_requests(), first=0),  # one byte per read
        _session(Publish(1, "Q", "e", b"before hello")),
        bytes([63]) + b"\xff\xff\xff\xff" + b"\x00" * 16,  # a length prefix past every limit
    ]


def session_seeds() -> list[bytes]:
    """Requests after the harness's HELLO, and a few whole connections, for the ``session`` target."""
    return [
        _session(*_requests()),
        _session(*_requests(), first=PRODUCER | 63),
        _session(*_requests(), first=0),  # one byte per read
        _session(
            Publish(2, "Q", "e", b"a"), Publish(3, "Q", "e", b"b"), Publish(4, "R", "e", b"c"), first=PRODUCER | 7
        ),
        _session(Subscribe(2, 1, "Q", (), None, "new"), Publish(3, "Q", "e", None), Ping(4)),
        _session(Publish(1, "Q", "e", b"before hello"), first=RAW | 63),
        _session(_hello(token="wrong"), first=RAW | 63),
        _session(_hello("p1"), first=RAW | 63),
        _session(_hello(), Bye(), first=RAW | 63),  # a health check: HELLO and BYE in one write
        _session(Ping(2), Bye()),
        bytes([63]) + b"\xff\xff\xff\xff" + b"\x00" * 16,  # a length prefix past every limit
    ]


def recovery_seeds() -> list[bytes]:
    """Segment files (with and without a recovery point) for the ``recovery`` target."""
    out: list[bytes] = []
    root = Path(tempfile.mkdtemp(prefix="tidings-seeds-"))
    try:
        for n in (0, 1, 3):
            queue = root / f"q{n}"
            log = QueueLog.open(queue, segment_bytes=1 << 20, extend_bytes=4096)
            for i in range(n):
                log.append([b"\x01\x02" + bytes([i]) * (10 + i)], 1000 + i)
            log.sync()
            segment = (queue / f"{0:020d}.log").read_bytes()
            out.append(b"\x00" + segment)  # as a crash leaves it: the preallocated zero tail included
            log.close()
            point = queue / "recovery-point"
            if point.exists():  # a clean stop wrote it
                out.append(b"\x01" + point.read_bytes() + (queue / f"{0:020d}.log").read_bytes())
        torn = out[-1]
        out.append(torn[: len(torn) - 5])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def session_users_seeds() -> list[bytes]:
    """The session seeds, and the same requests on queues the user may not use (see ``targets.USERS``)."""
    elsewhere = [_session(*(replace(f, queue=q) if hasattr(f, "queue") else f for f in _requests()))
                 for q in ("R", "S", "Q.dead")]  # fmt: skip
    return [*session_seeds(), *elsewhere]


SEEDS = {
    "decoder": decoder_seeds,
    "session": session_seeds,
    "session-users": session_users_seeds,
    "recovery": recovery_seeds,
}
