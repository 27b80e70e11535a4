"""Coverage-guided fuzz targets (RELIABILITY.md F5), plain functions of bytes.

Each target takes one input and raises ``AssertionError`` (or any other
exception) for a bug; returning means the input was handled as promised.
``python -m tests.fuzz TARGET`` runs one under atheris (``make fuzz``);
``tests/fuzz/test_corpus.py`` replays every saved input in ``make test``.

* ``decoder``: bytes to the broker's side of a connection, cut into chunks
  the input chooses, answered WELCOME after a HELLO as the broker does, and
  decoded with ``events()`` or, as the broker does, ``events_spliced()``
  (the input's first byte says which). Only ``RemoteProtocolError`` (with a
  connection-ending code) may come out, and every frame decoded before it
  must re-encode.
* ``session``: bytes to a real broker's session (decoder, dispatcher,
  handlers, a real store on a RAM disk with ``--fsync never``), in process,
  after a HELLO of the harness's unless the input's first byte says not
  (a client may send nothing before WELCOME, so requests pipelined behind
  a HELLO of the input's own would all be UNEXPECTED_FRAME).
* ``session-users``: the same with a users file, as a user with some rights
  on some queues (the permission checks at every entry point).

  In both, nothing may be logged at ERROR (a handler that raised logs
  "internal error"), no callback may fail, every byte the broker writes must
  be well-formed frames, and closing must leave no connection behind.
* ``recovery``: bytes as a queue's segment file (and, when the input says
  so, its recovery point). Opening must load a log or refuse it with
  ``CorruptLogError``; a loaded log reads back every record and takes an
  append that survives a reopen; opening with ``repair`` never refuses.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import Broker, BrokerConfig
from broker.config import FsyncPolicy
from broker.log import QueueLog
from broker.segment import CorruptLogError
from broker.session import Session
from broker.users import load_users
from protocol import (
    PROTOCOL_VERSION,
    Connection,
    FrameDecoder,
    Hello,
    Limits,
    RemoteProtocolError,
    Role,
    Welcome,
    encode_frame,
)
from protocol.errors import FATAL_CODES
from protocol.framing import unpack_body
from protocol.messages import FRAME_CLASSES

#: Small limits, so that "too large" paths are reachable by small inputs.
LIMITS = Limits(max_frame_size=4096, handshake_frame_size=1024)
#: Where the session and recovery targets keep their files: a RAM disk when there is one.
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


#: The first byte of an input: bits 0-5 the chunk size - 1, then these flags
#: (bit 6 means one thing to the session targets, another to the decoder's).
PRODUCER = 0x40  # the harness's HELLO names a producer (PUBLISH reqs are sequence numbers)
SPLICED = 0x40  # (decoder target) decode with events_spliced(), the broker's way
RAW = 0x80  # no HELLO from the harness: the input starts the connection itself


def _chunks(data: bytes) -> list[bytes]:
    """The input's first byte picks a chunk size (1..64) for the rest: frames
    then arrive split anywhere, or many to a read."""
    if not data:
        return []
    size = (data[0] & 0x3F) + 1
    body = data[1:]
    return [body[i : i + size] for i in range(0, len(body), size)]


def decoder(data: bytes) -> None:
    conn = Connection(Role.BROKER, limits=LIMITS)
    spliced = bool(data) and bool(data[0] & SPLICED)
    for chunk in _chunks(data):
        conn.receive_data(chunk)
        try:
            events = conn.events_spliced() if spliced else conn.events()
        except RemoteProtocolError as exc:
            assert exc.code in FATAL_CODES, f"a decoding error with a request-level code: {exc.code!r}"
            return
        for event in events:
            if type(event) is tuple:  # a spliced PUBLISH: req, queue, event and payload
                req, queue, head, payload = event
                assert isinstance(req, int) and isinstance(queue, str) and head and isinstance(payload, bytes)
                continue
            if isinstance(event, Hello):
                conn.send(Welcome(event.req, PROTOCOL_VERSION, "fuzz", 1, LIMITS.max_frame_size, 0))
            frame_to_wire = getattr(event, "to_wire", None)
            if frame_to_wire is not None:
                frame_to_wire()  # a frame the decoder accepted is a frame we can send


class _Transport:
    """What a Session writes to: keeps the bytes; close and abort end the
    connection on the next loop turn, as asyncio's transports do, and the
    harness feeds no more while reading is paused, as they would not."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.out = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.session.connection_lost, None)

    abort = close


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + (f"\n{record.exc_text}" if record.exc_text else ""))


def _frames(out: bytes) -> int:
    """Decode everything the broker wrote; the number of frames."""
    decoder = FrameDecoder(1 << 24)
    count = 0
    for body in decoder.feed(bytes(out)):
        items = unpack_body(body, 1 << 24)
        FRAME_CLASSES[items[0]].from_wire(items)
        count += 1
    assert decoder.buffered == 0, f"the broker wrote {decoder.buffered} bytes that are not a whole frame"
    return count


#: The ``session-users`` target's users file: the harness's HELLO is user ``u``'s.
USERS = """
[users.u]
token = "fuzz-user-token"
publish = ["Q", "Q.*"]
subscribe = ["Q", "R*"]
delete = ["R"]
"""


async def _session(data: bytes, root: Path, users: bool) -> None:
    users_file = root / "users.toml" if users else None
    if users_file is not None:
        users_file.write_text(USERS)
    config = BrokerConfig(host="127.0.0.1", port=0, data_dir=root / "data", fsync=FsyncPolicy.NEVER, limits=LIMITS,
                          users_file=users_file)  # fmt: skip
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []  # every task the broker starts, to check how each ended

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        tasks.append(task)
        return task

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    broker = Broker(config)
    if users_file is not None:
        broker.users = load_users(users_file)  # (what Broker.start() does; this harness opens the store itself)
    broker.store.open()
    session = Session(broker)
    transport = _Transport(session)
    session.connection_made(transport)  # type: ignore[arg-type]
    if data and not data[0] & RAW:
        hello = Hello(1, PROTOCOL_VERSION, "fuzz", {"token": "fuzz-user-token"} if users else None,
                      "fuzz-producer" if data[0] & PRODUCER else None)  # fmt: skip
        session.data_received(encode_frame(hello.to_wire()))
    for chunk in _chunks(data):
        for _ in range(3):
            if not transport.paused:
                break
            await asyncio.sleep(0)  # confirms that catch up resume reading
        if transport.closing or transport.paused:
            break
        session.data_received(chunk)
        await asyncio.sleep(0)  # commits and confirms run on the next turns
    for _ in range(3):
        await asyncio.sleep(0)
    transport.close()
    await asyncio.sleep(0)
    if pending := [t for t in tasks if not t.done()]:
        await asyncio.wait(pending)
    for task in tasks:  # (an exception no one retrieves is reported only when the task is freed)
        exc = None if task.cancelled() else task.exception()
        assert exc is None, "".join(traceback.format_exception(exc))
    assert not broker.sessions, "the closed connection is still registered"
    await broker.store.aclose()
    _frames(bytes(transport.out))


def session(data: bytes, *, users: bool = False) -> None:
    errors = _Errors()
    failures: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="tidings-fuzz-", dir=SCRATCH))
    logging.getLogger().addHandler(errors)
    try:
        with asyncio.Runner() as runner:
            runner.get_loop().set_exception_handler(lambda _loop, ctx: failures.append(str(ctx.get("message"))))
            runner.run(_session(data, root, users))
    finally:
        logging.getLogger().removeHandler(errors)
        shutil.rmtree(root, ignore_errors=True)
    assert not errors.messages, errors.messages
    assert not failures, failures


def _all(log: QueueLog) -> list[bytes]:
    out: list[bytes] = []
    offset = log.first_offset
    while offset < log.next_offset:
        got = log.read(offset, max_count=1000, max_bytes=1 << 20)
        assert got and got[0][0] == offset, f"no record at {offset} below {log.next_offset}"
        out += [body for _, _, body in got]
        offset = got[-1][0] + 1
    return out


def recovery(data: bytes) -> None:
    """Input: flags byte (bit 0: the next 16 bytes are the recovery point),
    then the segment file's bytes."""
    root = Path(tempfile.mkdtemp(prefix="tidings-fuzz-", dir=SCRATCH))
    try:
        flags, rest = (data[0], data[1:]) if data else (0, b"")
        queue = root / "q"
        queue.mkdir()
        if flags & 1 and len(rest) >= 16:
            (queue / "recovery-point").write_bytes(rest[:16])
            rest = rest[16:]
        (queue / f"{0:020d}.log").write_bytes(rest)
        copy = root / "copy"
        shutil.copytree(queue, copy)
        try:
            log = QueueLog.open(queue, segment_bytes=1 << 20, extend_bytes=4096)
        except CorruptLogError:
            log = None
        if log is not None:
            bodies = _all(log)
            assert len(bodies) == log.next_offset - log.first_offset
            end = log.append([b"\x01\x02after"], 1)
            assert end == log.next_offset - 1
            log.sync()
            log.close()
            again = QueueLog.open(queue, segment_bytes=1 << 20, extend_bytes=4096)
            assert _all(again) == [*bodies, b"\x01\x02after"], "a reopen lost or changed records"
            again.close()
        repaired = QueueLog.open(copy, segment_bytes=1 << 20, repair=True, extend_bytes=4096)  # never refuses
        kept = _all(repaired)
        if log is not None:
            assert kept == bodies, "repair changed a log that opened without it"
        repaired.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def session_users(data: bytes) -> None:
    session(data, users=True)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "decoder": decoder,
    "session": session,
    "session-users": session_users,
    "recovery": recovery,
}
