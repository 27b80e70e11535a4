"""The SQLite-style I/O error loop (RELIABILITY.md D3).

For k = 1, 2, ... the k-th storage operation of a broker's life fails with
EIO, once, then (second mode) every operation from the k-th on; the loop
ends at the first k past the operations a clean run makes. Each run is a
real in-process broker on a real socket, started on a data directory that
a clean life left (two queues, a durable's cursor: the start recovers them,
and the first FETCH reads records from the files), with a real client
publishing to both queues (segments of 4 KiB, so the run rolls them), the
durable reading and acking by FETCH, two cursor saves, and a graceful stop
(final sync, cursor saves, recovery point). Then, faults off, another
broker opens the same directory, and the run passes when:

* nothing crashed: every request was answered (or its connection dropped,
  the fail-stop of a failed fsync, R7 and D2), no task or callback failed,
  nothing was logged at ERROR but the failure itself (see ALLOWED_ERRORS);
* the log is valid: the broker starts and serves both queues;
* lost 0: every confirmed message is at its offset, nothing refused is
  there, nothing is there twice, nothing unpublished is there;
* the durable's cursor is never ahead: every message it did not ack is
  delivered again.

The operations are the storage layer's system calls on the data directory:
``open``, ``write``, ``pwrite``, ``pread``, ``fsync``, ``fdatasync``,
``ftruncate`` and ``os.replace`` (a rename). A failing write first writes half of its bytes
(a short write, then the error), so that a failed append leaves part of its
records in the file, as a real one can. Nothing else about the disk is
changed: unsynced data is not dropped (that is the power-loss test's part).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from broker import Broker, BrokerConfig
from broker.log import POINT_FILE
from client import Client
from protocol import ConnectionLost, Err, ErrorCode, PubAck, Publish, ServerError
from tests.checker import History, check, read_all
from tests.helpers import RawPeer, running_broker, url_of

#: The ERROR and CRITICAL lines a run may log: the fail-stop itself (R7); what
#: a graceful stop says when its final fsync fails after it; a queue whose
#: recovery could not read or sync its files (refused, or loaded again); a read
#: that failed (its readers stop there and try again).
ALLOWED_ERRORS = re.compile(
    r"storage failure, no more publishes will be confirmed: |final fsync failed: "
    r"|queue Q\d cannot be served: |queue Q\d: cannot read from record \d+ "
)
BURSTS = 5
PER_BURST = 8
PAD = {"pad": "p" * 250}  # headers: with segments of 4 KiB, two rolls per queue in a run


class FailingDisk:
    """Fails the ``nth`` storage operation on ``root`` (and with ``persistent``, all after it).

    Counts the calls of :data:`CALLS` on paths under ``root`` and on
    descriptors opened there; others pass through untouched. Thread-safe: the
    committer and the cursor saver run on their own threads.
    """

    CALLS = ("open", "write", "pwrite", "pread", "fsync", "fdatasync", "ftruncate", "replace")

    def __init__(self, root: Path, nth: int, *, persistent: bool, only: frozenset[str] | None = None) -> None:
        self.root = str(root)
        self.nth = nth
        self.persistent = persistent
        #: The operations that may fail (None: all); the others are only counted.
        self.only = only
        self.count = 0
        #: The operations made, in order (the failed ones included).
        self.ops: list[str] = []
        self._fds: set[int] = set()
        self._lock = threading.Lock()
        self._real: dict[str, Callable[..., Any]] = {name: getattr(os, name) for name in (*self.CALLS, "close")}

    def _mine(self, path: object) -> bool:
        return os.fsdecode(os.fspath(path)).startswith(self.root)  # type: ignore[arg-type]

    def _step(self, name: str) -> None:
        with self._lock:
            self.count += 1
            self.ops.append(name)
            if self.only is not None and name not in self.only:
                return
            if self.count == self.nth or (self.persistent and self.count > self.nth):
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected: operation {self.count}, {name})")

    def fail_from_now(self) -> None:
        """Fail every operation (of ``only``) from now on."""
        with self._lock:
            self.nth, self.persistent = self.count + 1, True

    def heal(self) -> None:
        """Fail nothing from now on."""
        with self._lock:
            self.nth, self.persistent = 0, False

    def _open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if not self._mine(path):
            return int(self._real["open"](path, flags, mode, **kw))
        self._step("open")
        fd = int(self._real["open"](path, flags, mode, **kw))
        with self._lock:
            self._fds.add(fd)
        return fd

    def _close(self, fd: int) -> None:
        with self._lock:
            self._fds.discard(fd)
        self._real["close"](fd)

    def _on_fd(self, name: str) -> Callable[..., Any]:
        real = self._real[name]

        def call(fd: int, *args: Any) -> Any:
            if fd in self._fds:
                try:
                    self._step(name)
                except OSError:
                    if name in ("write", "pwrite") and len(args[0]) > 1:
                        # A short write, then the error: half of it is in the page cache.
                        half = memoryview(args[0])[: len(args[0]) // 2]
                        real(fd, half, *args[1:])
                    raise
            return real(fd, *args)

        return call

    def _replace(self, src: Any, dst: Any, **kw: Any) -> None:
        if self._mine(src):
            self._step("replace")
        self._real["replace"](src, dst, **kw)

    @contextlib.contextmanager
    def installed(self) -> Iterator[FailingDisk]:
        fakes = {"open": self._open, "close": self._close, "replace": self._replace}
        fakes |= {name: self._on_fd(name) for name in ("write", "pwrite", "pread", "fsync", "fdatasync", "ftruncate")}
        with contextlib.ExitStack() as stack:
            for name, fake in fakes.items():
                stack.enter_context(mock.patch.object(os, name, fake))
            yield self


class _Errors(logging.Handler):
    """Every ERROR or worse line logged, but the allowed ones."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if ALLOWED_ERRORS.match(message) is None:
            self.lines.append(f"{record.name}: {message}" + (" (with a traceback)" if record.exc_info else ""))


def _open_under(path: Path) -> list[str]:
    """The files under ``path`` this process has open (Linux's /proc)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor is gone)
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{path}/"):
                found.append(target)
    return found


def _config(data: Path) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=0, data_dir=data, segment_bytes=4096)


async def _workload(
    broker: Broker, history: History, acked: set[tuple[int, int]], bursts: range, fetch_after: dict[int, int]
) -> None:
    """Bursts of concurrent publishes to Q1 and Q2; after burst ``b`` in
    ``fetch_after``, Q1's durable fetches up to that many and acks them, and
    its cursor is saved."""
    async with Client(url_of(broker), name="pub", reconnect=False, timeout=5) as pub:
        for burst in bursts:
            first = burst * 2 * PER_BURST
            sent = [(queue, first + n) for n, queue in enumerate(["Q1", "Q2"] * PER_BURST)]
            outcomes = await asyncio.gather(
                *(pub.publish(queue, "E", [0, s], headers=PAD) for queue, s in sent), return_exceptions=True
            )
            for (queue, s), outcome in zip(sent, outcomes, strict=True):
                if isinstance(outcome, int):
                    history.ok[(0, s)] = (queue, outcome)
                elif isinstance(outcome, ConnectionLost):  # the fail-stop drops the connection
                    history.unknown.add((0, s))
                elif isinstance(outcome, ServerError):
                    history.failed.add((0, s))
                else:
                    raise outcome
            if history.unknown:
                return
            if burst in fetch_after:
                try:
                    for msg in await pub.fetch("Q1", durable="d", max_messages=fetch_after[burst]):
                        await msg.ack()
                        acked.add((int(msg.payload[0]), int(msg.payload[1])))
                    await pub.ping()  # the acks (never answered) are handled before the PONG
                except (ConnectionLost, ServerError):
                    return
                await broker.store.flush_cursors()  # (the broker's periodic save, now)


async def _run(data: Path, nth: int, *, persistent: bool) -> tuple[list[str], list[str]]:
    """A clean broker life that leaves records and a cursor behind; then a
    life with the ``nth`` operation failing; then the checks. Returns the
    operations the second life made, and what went wrong."""
    history, acked = History(), set[tuple[int, int]]()
    async with running_broker(data, segment_bytes=4096) as first:
        await _workload(first, history, acked, range(1), {0: 3})
    assert not history.failed | history.unknown
    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)
    disk = FailingDisk(data, nth, persistent=persistent)
    try:
        with disk.installed():
            # Recovery reads the segments; the first FETCH reads records the
            # first life left (the in-memory tail starts empty).
            broker = Broker(_config(data))
            try:
                await broker.start()
            except OSError:
                pass  # refused to start (its data directory failed): a clean outcome
            else:
                try:
                    await _workload(broker, history, acked, range(1, BURSTS), {2: 1000, BURSTS - 1: 1000})
                finally:
                    await broker.aclose()
    finally:
        root.removeHandler(errors)
    problems = [f"logged {line}" for line in errors.lines]
    async with running_broker(data, segment_bytes=4096) as again:
        if again.store.failed:
            problems.append(f"queues refused after the restart: {again.store.failed}")
            return disk.ops, problems
        async with Client(url_of(again), name="check", reconnect=False) as c:
            report = check(history, {q: await read_all(c, q) for q in ("Q1", "Q2") if q in again.store.queues})
            if not report.clean:
                problems.append(f"{report}")
            if "Q1" in again.store.queues and "d" in again.store.queues["Q1"].groups:
                present = {(0, int(p[1])) for _, p in await read_all(c, "Q1")}
                again_ = await c.fetch("Q1", durable="d", max_messages=10_000)
                redelivered = {(int(m.payload[0]), int(m.payload[1])) for m in again_}
                if ahead := present - acked - redelivered:
                    problems.append(f"durable cursor ahead of the acks: {sorted(ahead)} neither acked nor redelivered")
    return disk.ops, problems


@pytest.mark.one_loop
async def test_the_kth_storage_operation_fails(tmp_path: Path) -> None:
    """D3: every k, once and persistently; the run passes as the module docstring says."""
    clean, problems = await _run(tmp_path / "clean", 0, persistent=False)
    assert not problems, problems
    # The workload reaches recovery reads, rolls, syncs, truncations, cursor saves.
    assert set(FailingDisk.CALLS) <= set(clean), clean
    failures: list[str] = []
    for persistent in (False, True):
        for nth in range(1, len(clean) + 2):
            data = tmp_path / f"{'p' if persistent else 'o'}{nth}"
            ops, problems = await _run(data, nth, persistent=persistent)
            what = ops[nth - 1] if nth <= len(ops) else "none"
            failures += [f"op {nth}, {what} ({'from then on' if persistent else 'once'}): {p}" for p in problems]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.one_loop
async def test_a_read_error_fails_the_fetch_and_stalls_push_until_it_passes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error reading the log (EIO from pread) is not damage: a FETCH that
    meets it is answered STORAGE_FAILED on a connection that stays open (it
    was an internal error that closed the connection), a push subscriber
    stops before it without a frame, and both carry on in order once reads
    work again. Records older than the restart are read from the files."""
    history, acked = History(), set[tuple[int, int]]()
    async with running_broker(tmp_path, segment_bytes=4096) as first:
        await _workload(first, history, acked, range(2), {})
    disk = FailingDisk(tmp_path, 0, persistent=False, only=frozenset({"pread"}))
    with disk.installed():
        async with (
            running_broker(tmp_path, segment_bytes=4096) as broker,
            Client(url_of(broker), name="c", reconnect=False) as c,
        ):
            disk.fail_from_now()
            for _ in range(2):
                with pytest.raises(ServerError, match=r"cannot read queue 'Q1' from record 0 .*try again") as info:
                    await c.fetch("Q1", durable="puller", start="earliest", max_messages=100)
                assert info.value.code == ErrorCode.STORAGE_FAILED
            sub = await c.subscribe("Q2", durable="pusher", start="earliest", prefetch=100)
            assert (await c.ping()) >= 0  # the SUBSCRIBE's pump met the error: nothing sent, still connected
            assert sub.pending == 0
            disk.heal()
            got = await c.fetch("Q1", durable="puller", max_messages=100)
            assert [m.offset for m in got] == list(range(2 * PER_BURST))
            await c.publish("Q2", "E", [1, 0])  # the next turn of the durable's reader
            offsets = [(await sub.next(timeout=5)).offset for _ in range(2 * PER_BURST + 1)]
            assert offsets == list(range(2 * PER_BURST + 1))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(ALLOWED_ERRORS.match(e) for e in errors), errors
    assert sum("cannot read from record 0" in e for e in errors) == 2  # once per queue, not per try


@pytest.mark.one_loop
async def test_a_resend_that_cannot_be_looked_up_is_refused_not_stored_twice(tmp_path: Path) -> None:
    """A producer's resent publish is looked up in the log (its sequence
    headers); when that read fails, the publish is answered STORAGE_FAILED
    rather than stored a second time, and the same resend is confirmed with
    its original offset once reads work again."""
    async with running_broker(tmp_path) as first:
        peer = await RawPeer.connect(first, producer="p1")
        peer.send_frame(Publish(1, "Q", "E", "x"))
        assert await peer.recv() == PubAck(1, 0)
        peer.close()
    disk = FailingDisk(tmp_path, 0, persistent=False, only=frozenset({"pread"}))
    with disk.installed():
        async with running_broker(tmp_path, dedup_window=3600) as broker:
            disk.fail_from_now()
            peer = await RawPeer.connect(broker, producer="p1")
            peer.send_frame(Publish(1, "Q", "E", "x"))  # a resend: 1 is not above the last stored
            reply = await peer.recv()
            assert isinstance(reply, Err) and reply.code == ErrorCode.STORAGE_FAILED, reply
            disk.heal()
            peer.send_frame(Publish(1, "Q", "E", "x"))
            assert await peer.recv() == PubAck(1, 0, duplicate=True)
            assert broker.store.queues["Q"].log.next_offset == 1
            peer.close()


@pytest.mark.one_loop
async def test_a_queue_unreadable_at_start_up_is_loaded_again_once_it_reads(tmp_path: Path) -> None:
    """An I/O error recovering a queue at start-up (EIO from pread) is not
    damage: the queue is refused with STORAGE_FAILED ("try again"), not
    QUEUE_CORRUPT until a restart, and its first use after the files read
    again (at most once per reload interval) loads it, with the records and
    the durable's cursor the first life left. Its log was closed after the
    failure (no descriptor kept per try)."""
    history, acked = History(), set[tuple[int, int]]()
    async with running_broker(tmp_path, segment_bytes=4096) as first:
        await _workload(first, history, acked, range(1), {0: 3})
    disk = FailingDisk(tmp_path, 1, persistent=True, only=frozenset({"pread"}))
    with disk.installed():
        async with (
            running_broker(tmp_path, segment_bytes=4096) as broker,
            Client(url_of(broker), name="c", reconnect=False) as c,
        ):
            assert sorted(broker.store.failed) == ["Q1", "Q2"]
            failed = {q["name"]: q["error"] for q in (await c.status())["failed_queues"]}
            assert "loaded again when next used" in failed["Q1"], failed
            broker.store.reload_interval = 0
            for attempt in (c.publish("Q2", "E", [1, 0]), c.fetch("Q1", durable="d", max_messages=100)):
                with pytest.raises(ServerError, match=r"queue 'Q\d' is unavailable: .*try again") as info:
                    await attempt
                assert info.value.code == ErrorCode.STORAGE_FAILED
            assert not _open_under(tmp_path / "queues"), "a failed load left files open"
            disk.heal()
            broker.store.reload_interval = 3600  # not due: still refused
            with pytest.raises(ServerError, match="try again"):
                await c.publish("Q2", "E", [1, 0])
            broker.store.reload_interval = 0
            assert await c.publish("Q2", "E", [1, 0]) == PER_BURST  # after the first life's records
            got = await c.fetch("Q1", durable="d", max_messages=100)
            assert [m.offset for m in got] == list(range(3, PER_BURST))  # the durable acked 0-2
            assert not broker.store.failed and not (await c.status())["failed_queues"]


@pytest.mark.one_loop
async def test_a_failed_fsync_in_recovery_refuses_the_queue_until_a_restart(tmp_path: Path) -> None:
    """Recovery fsyncs a tail no record vouches for (here: no recovery point,
    as after a kill -9); if that fsync fails, what is on disk is unknown, so
    the queue is refused (STORAGE_FAILED, not "try again") and never loaded
    again in this life, even once the disk works; the next start serves it."""
    async with running_broker(tmp_path) as first, Client(url_of(first), name="c", reconnect=False) as c:
        for n in range(5):
            await c.publish("Q", "E", n)
    (tmp_path / "queues" / "Q" / POINT_FILE).unlink()
    disk = FailingDisk(tmp_path, 1, persistent=True, only=frozenset({"fsync"}))
    with disk.installed():
        async with (
            running_broker(tmp_path) as broker,
            Client(url_of(broker), name="c", reconnect=False) as c,
        ):
            assert "not served until a restart" in broker.store.failed["Q"]
            disk.heal()
            broker.store.reload_interval = 0
            with pytest.raises(ServerError, match="not served until a restart") as info:
                await c.publish("Q", "E", 5)
            assert info.value.code == ErrorCode.STORAGE_FAILED and "try again" not in str(info.value)
    async with running_broker(tmp_path) as again, Client(url_of(again), name="c", reconnect=False) as c:
        assert await c.publish("Q", "E", 5) == 5
