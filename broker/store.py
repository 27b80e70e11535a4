"""The data directory: queues by name, their durables, group commit, cursor flushes.

Layout::

    <data_dir>/queues/<queue>/00000000000000000000.log ...   the queue's segments
    <data_dir>/queues/<queue>/durables/<durable>.cursor       one cursor per durable
    <data_dir>/LOCK                                           held (flock) by the broker using it

Names are checked against the closed alphabet of ``protocol.names`` before
they reach this module, and paths are checked again here, so no name can
escape the data directory.

Group commit (``--fsync always``)
---------------------------------
Sessions append on the event-loop thread (a ``write()`` into the page cache)
and mark the queue dirty. One committer thread loops: take the dirty queues
and each one's end offset, fsync them (several queues in parallel on the sync
pool; the loop keeps running, and publishes that arrive meanwhile wait for
the next round), then hand the batch back to the loop with one
``call_soon_threadsafe``, where ``commit()`` moves each queue up to the offset
it had, which sends the PUBACKs and delivers. One fsync thus serves every
publish that arrived while the previous one ran. A dedicated thread, rather
than an asyncio task awaiting executor futures, halves the hand-off: one
wake-up each way and no futures, gather or task steps (about 40 against 95 us
a round here), which is most of what a lone publisher waits for besides the
fsync itself. Even that is skipped for the smallest rounds: appends only note
their queue, and once per loop turn :meth:`Store._kick` either fsyncs a round
of one queue and at most ``INLINE_MAX_RECORDS`` records right there on the
loop thread, if the committer is idle and only one connection awaits
confirms (no thread wake-up either way), or hands the queues to the
committer. The round lock makes the two exclusive.
A failed fsync is fatal (R7): nothing more is confirmed and the broker stops
through ``on_fatal``. With ``--fsync interval`` the same thread
syncs the dirty queues every interval (records were confirmed at write).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, NoReturn

from protocol import ErrorCode
from protocol.wording import many

from .config import RECORD_ROOM, BrokerConfig, FsyncPolicy
from .cursors import DURABLES_DIR, Cursor, CursorState, CursorStore
from .deadletter import dead_letter
from .durables import settings_of
from .log import LogFailedError, QueueLog, fsync_dir
from .queue import Queue, QueueUnavailable
from .retention import enforce_retention
from .router import Group
from .segment import for_clients

__all__ = ["DataDirInUse", "Store", "group_from_state", "is_trash", "lock_holder"]

logger = logging.getLogger(__name__)

#: Worker threads for fsyncs: queues sync in parallel (their files are independent).
SYNC_THREADS: Final = 4
#: A commit round of one queue with at most this many unconfirmed records is
#: fsynced on the loop thread when the committer is idle (see Store._kick):
#: the lone publisher's case. Larger rounds keep the loop free during the
#: fsync (about 0.2 ms here), which matters once there is traffic to read.
INLINE_MAX_RECORDS: Final = 32
#: The data directory's lock file: one broker per directory (see Store.open).
LOCK_FILE: Final = "LOCK"
#: A deleted queue's directory is renamed to this + its name + a time, then removed
#: (a leading "." is no queue's name: see protocol.names).
TRASH_PREFIX: Final = ".deleted-"
#: A queue whose files could not be read at start-up (an I/O error such as
#: EIO or EACCES, not damage) is loaded again when next used, at most this
#: often (seconds): recovery reads the whole log.
RELOAD_INTERVAL: Final = 1.0


class Store:
    """Every queue of the broker, and the tasks that make them durable.

    Args:
        config: the broker's configuration.
        on_fatal: called with a reason when storage can no longer be trusted.
    """

    def __init__(self, config: BrokerConfig, on_fatal: Callable[[str], None]) -> None:
        self.config = config
        self.root = Path(config.data_dir).resolve()
        self.queues_dir = self.root / "queues"
        self.queues: dict[str, Queue] = {}
        self.cursor_stores: dict[str, CursorStore] = {}
        self.failed: dict[str, str] = {}  # queue -> why it cannot be served
        #: Failed queues that may load later (an I/O error, not damage): when they failed.
        self._failed_at: dict[str, float] = {}
        self._failed_code: dict[str, ErrorCode] = {}  # queue -> the error its requests get
        self.reload_interval = RELOAD_INTERVAL
        self._on_fatal = on_fatal
        self._dirty: set[Queue] = set()  # guarded by _commit_cond
        self._commit_cond = threading.Condition()
        self._commit_thread: threading.Thread | None = None
        self._round_lock = threading.Lock()  # held by the committer from taking a batch to handing it back
        self._stopping = False
        self._commit_dead = False
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="tidings-sync")
        self._cursor_pool = ThreadPoolExecutor(1, thread_name_prefix="tidings-cursor")
        self._tasks: set[asyncio.Task[None]] = set()
        self._fatal = False
        self._closed = False
        self.fsyncs = 0
        #: Connections with publishes awaiting their confirm (kept by the sessions):
        #: only a lone publisher's rounds are synced on the loop (see _kick).
        self.publishers = 0
        self._deleting: set[str] = set()  # log fsyncs by the committer, for STATUS (fsyncs per confirm)
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._fresh: set[Queue] = set()  # appended to during this loop turn (--fsync always)
        self._stamp_floor = 0  # the latest record timestamp handed out or found (see now_ms)
        self._lock_fd: int | None = None  # the LOCK file, locked while the store is open
        self._kick_scheduled = False

    @property
    def fatal(self) -> bool:
        """True once storage failed: nothing more may be confirmed."""
        return self._fatal

    # --- opening ------------------------------------------------------------

    def open(self) -> None:
        """Lock the data directory, creating it, and recover every queue found in it.

        Raises:
            DataDirInUse: another broker (process, or Broker in this process) has it.
            OSError: the directory cannot be created or locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.queues_dir.mkdir(exist_ok=True)
            for path in sorted(self.queues_dir.iterdir()):
                if is_trash(path):
                    logger.warning("%s: removing what an interrupted DELETE left", path)
                    shutil.rmtree(path)
                elif path.is_dir():
                    try:
                        self._load(path.name)
                    except Exception as exc:  # a damaged queue must not stop the others
                        self._load_failed(path.name, exc)
        except BaseException:
            self._unlock()
            raise
        refused = f", {len(self.failed)} refused (see above)" if self.failed else ""
        logger.info("data in %s: %s%s", self.root, many(len(self.queues), "queue"), refused)

    def _lock(self) -> None:
        """Take ``LOCK`` (an exclusive ``flock``, dropped by the kernel when the
        process dies, so a killed broker leaves nothing stale behind) and write
        our pid in it for the next one's error message. Two brokers on one
        directory would each append at the offsets they think are next: the
        same offsets, confirmed twice, one copy lost."""
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:  # a shared holder is a check (broker.check), which writes no pid
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                by = " (tidings-broker --check is reading it)"
            except BlockingIOError:
                by = f" by another broker{lock_holder(fd)}"
            os.close(fd)
            raise DataDirInUse(f"data directory {self.root} is in use{by}") from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # (only the message above reads it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # (releases the flock)
            self._lock_fd = None

    def frame_limit(self, configured: int) -> int:
        """The frame limit to serve with, given the ``configured`` one (call after :meth:`open`).

        A record stored under a larger limit than today's must still go out
        in a frame its readers take (a client refuses a frame over the limit
        WELCOME announced, then gets the same record again on reconnecting,
        for ever). So the limit announced covers the longest record the
        recovery scan found, with its ``RECORD_ROOM``; new messages are held
        to ``configured`` (``max_message_bytes``). Once retention or a DELETE
        has dropped such records, a restart announces ``configured`` again.
        """
        longest = max((q.log.largest_record for q in self.queues.values()), default=0)
        limit = max(configured, longest + RECORD_ROOM) if longest else configured
        if limit > configured:
            logger.warning(
                "frame limit %d is below %d, which messages stored under an earlier one need: frames up to %d "
                "bytes still go out, and new messages are held to the lower limit", configured, limit, limit,
            )  # fmt: skip
        return limit

    def _load_failed(self, name: str, exc: Exception, *, again: bool = False) -> None:
        """Recovery of ``name`` failed: refuse it, for good if damaged, else until a reload works.

        An I/O error may pass (EIO from a flaky disk, EACCES until an admin
        fixes the permissions), so the queue is loaded again when next used.
        Damage (QUEUE_CORRUPT) and a failed write or fsync of the recovery
        (``LogFailedError``: what is on disk is unknown; STORAGE_FAILED) stay
        until a restart.
        """
        self._failed_at.pop(name, None)
        if isinstance(exc, LogFailedError):
            hint = " (not served until a restart)"
            self._failed_code[name] = ErrorCode.STORAGE_FAILED
        elif isinstance(exc, OSError):
            hint = " (an I/O error: loaded again when next used)"
            self._failed_code[name] = ErrorCode.STORAGE_FAILED
            self._failed_at[name] = time.monotonic()
        else:
            hint = "" if self.config.repair else " (tidings-broker --check says what --repair would do)"
            self._failed_code[name] = ErrorCode.QUEUE_CORRUPT
        # Clients (ERR frames, STATUS) are told the paths below the queues directory; the log has them whole.
        self.failed[name] = for_clients(exc, self.queues_dir) + hint
        logger.log(logging.WARNING if again else logging.ERROR, "queue %s cannot be served: %s%s", name, exc, hint)

    def _reload(self, name: str) -> Queue:
        """Load a queue that failed with an I/O error (see :meth:`_load_failed`), if due.

        Raises:
            QueueUnavailable: not due yet, or it failed again.
        """
        if time.monotonic() >= self._failed_at[name] + self.reload_interval:
            try:
                queue = self._load(name)
            except Exception as exc:
                self._load_failed(name, exc, again=True)
            else:
                del self.failed[name], self._failed_at[name], self._failed_code[name]
                logger.info("queue %s loaded: its files can be read again", name)
                return queue
        return self._unavailable(name)

    def _unavailable(self, name: str) -> NoReturn:
        """Raise QueueUnavailable for a queue in ``failed``, with its error code."""
        why = self.failed[name] + ("; try again" if name in self._failed_at else "")
        raise QueueUnavailable(name, why, code=self._failed_code[name])

    def _path(self, queue: str) -> Path:
        path = (self.queues_dir / queue).resolve()
        if path.parent != self.queues_dir:
            raise ValueError(f"queue name {queue!r} escapes the data directory")
        return path

    def _load(self, name: str) -> Queue:
        path = self._path(name)
        log = QueueLog.open(path, segment_bytes=self.config.segment_bytes, repair=self.config.repair)
        queue = Queue(name, log)
        queue.on_dead = functools.partial(dead_letter, self)
        self._stamp_floor = max(self._stamp_floor, log.last_ts)
        cursors = CursorStore(path / DURABLES_DIR)
        try:
            if log.next_offset > log.first_offset:
                queue.rebuild_dedup(self.config.dedup_window)
            for durable, state in cursors.load_all().items():
                queue.groups[durable] = group_from_state(queue, durable, state)
        except BaseException:
            log.close()  # (a queue loaded again later opens its files anew)
            raise
        self.queues[name] = queue
        self.cursor_stores[name] = cursors
        return queue

    def now_ms(self) -> int:
        """The time to stamp records with (ms since the epoch): the wall clock,
        but never below a timestamp already handed out or stored, so a clock
        set back (now or while the broker was down) cannot make a queue's
        timestamps decrease (SPEC section 4). The log clamps its record
        headers the same way; this keeps the stamp in each body, the one
        subscribers get, in step."""
        now = int(time.time() * 1000)
        if now < self._stamp_floor:
            return self._stamp_floor
        self._stamp_floor = now
        return now

    def known(self, name: str) -> bool:
        """Whether a queue called ``name`` exists (served, refused, or being deleted)."""
        return name in self.queues or name in self.failed or name in self._deleting

    def get(self, name: str, *, create: bool) -> Queue | None:
        """The queue called ``name``; created on first use when ``create``.

        Raises:
            QueueUnavailable: the queue failed its checks at start-up
                (QUEUE_CORRUPT), or its files could not be read or synced then
                (STORAGE_FAILED; one that could not be read is loaded again).
        """
        queue = self.queues.get(name)
        if queue is not None:
            return queue
        if name in self.failed:
            return self._reload(name) if name in self._failed_at else self._unavailable(name)
        if name in self._deleting:
            raise QueueUnavailable(name, "it is being deleted; retry", code=ErrorCode.CONFLICT)
        if not create:
            return None
        queue = self._load(name)
        logger.info("queue %s created", name)
        return queue

    def delete_queue(self, name: str) -> Awaitable[None]:
        """Remove a queue and all its files (the caller checked it is idle).

        Cursor saves run on their own thread: the queue leaves ``queues`` first
        (no new saves), a no-op on that thread waits out any save in flight (so
        none can recreate a file afterwards), then the directory goes. Until
        then the name is reserved: a PUBLISH to it gets CONFLICT.
        """
        queue = self.queues.pop(name)  # now, not when the returned coroutine runs
        self.cursor_stores.pop(name, None)
        self._deleting.add(name)
        return self._remove_queue_files(queue)

    def delete_failed(self, name: str) -> Awaitable[None]:
        """Remove the files of a queue that could not be served (damage found
        at start-up, say): the way to give up on it without stopping the
        broker. Its name is reserved until the files are gone, as for
        :meth:`delete_queue`."""
        del self.failed[name]
        self._failed_at.pop(name, None)
        self._failed_code.pop(name, None)
        self._deleting.add(name)
        return self._remove_failed_files(name)

    async def _remove_failed_files(self, name: str) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._cursor_pool, self._discard, name)
        finally:
            self._deleting.discard(name)

    def _discard(self, name: str) -> None:
        """Remove a queue's directory (on the cursor thread): renamed out of the
        way first, durably, then removed. A crash while removing the files one
        by one must not leave a queue that lost only some of them (a recovery
        point without its segments reads as lost records, and is refused); a
        renamed leftover is removed at the next start."""
        trash = self.queues_dir / f"{TRASH_PREFIX}{name}-{time.time_ns()}"
        os.rename(self._path(name), trash)
        fsync_dir(self.queues_dir)
        shutil.rmtree(trash)

    async def _remove_queue_files(self, queue: Queue) -> None:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._cursor_pool, lambda: None)
            # Records still unsynced are synced (and confirmed) by the committer first:
            # closing the log under an fsync in flight would fail it (EBADF: fatal).
            await loop.run_in_executor(self._cursor_pool, self._wait_synced, queue)
            queue.log.close()
            await loop.run_in_executor(self._cursor_pool, self._discard, queue.name)
        finally:
            self._deleting.discard(queue.name)

    def delete_durable(self, queue: Queue, name: str) -> Awaitable[None]:
        """Remove a durable now and its cursor files on the cursor thread, after
        any save of it already in flight (the caller checked it has no consumers)."""
        del queue.groups[name]
        store = self.cursor_stores[queue.name]
        return asyncio.get_running_loop().run_in_executor(self._cursor_pool, store.delete, name)

    # --- group commit -------------------------------------------------------

    def appended(self, queue: Queue) -> None:
        """``queue`` has new records: commit them per the fsync policy.

        With ``--fsync always`` the queue is only noted here; :meth:`_kick`
        commits everything noted once the loop has handled this turn's reads.
        """
        policy = self.config.fsync
        if policy is FsyncPolicy.ALWAYS and self._loop is not None:
            self._fresh.add(queue)
            if not self._kick_scheduled:
                self._kick_scheduled = True
                self._loop.call_soon(self._kick)
            return
        if policy is not FsyncPolicy.NEVER:
            with self._commit_cond:
                self._dirty.add(queue)
                self._commit_cond.notify()
        if policy is not FsyncPolicy.ALWAYS:
            queue.commit(queue.log.next_offset)

    def _kick(self) -> None:
        """On the loop, after a turn that appended: sync inline when small and idle, else hand over.

        A round of one queue with at most ``INLINE_MAX_RECORDS`` unconfirmed
        records from a lone publisher (one connection awaiting confirms),
        while the committer is idle, is fsynced right here: no wake-up of the
        committer and none of the loop afterwards (about a fifth of a lone
        publisher's round trip). Anything bigger, from several publishers, or
        arriving while a round is in flight, goes to the committer, so the
        loop keeps reading while the disk works (16 publishers at window 1:
        inline rounds cost about 15% of their throughput).
        """
        self._kick_scheduled = False
        fresh, self._fresh = self._fresh, set()
        if self._closed or self._fatal:
            return  # aclose() syncs every queue; after a failure nothing is confirmed
        if len(fresh) == 1 and self.publishers <= 1:
            (queue,) = fresh
            if queue.log.next_offset - queue.committed <= INLINE_MAX_RECORDS and self._commit_inline(queue):
                return
        with self._commit_cond:
            self._dirty.update(fresh)
            self._commit_cond.notify()

    def _commit_inline(self, queue: Queue) -> bool:
        """fsync and commit ``queue`` on the loop thread; False (nothing done) if the committer is busy."""
        if not self._round_lock.acquire(blocking=False):
            return False  # a round is in flight: the next one takes this queue
        try:
            with self._commit_cond:
                if self._dirty or self._commit_dead:
                    return False  # a round is about to start: join it
            upto = queue.log.next_offset
            try:
                queue.log.sync()
            except Exception as exc:  # as in the committer: fatal (R7)
                self.fail(f"fsync failed: {exc!r}")
                return True
        finally:
            self._round_lock.release()
        self.fsyncs += 1
        queue.commit(upto)
        return True

    def start(self) -> None:
        """Start the committer thread and the periodic flusher."""
        loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._ticker())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if self.config.fsync is not FsyncPolicy.NEVER:
            self._commit_thread = threading.Thread(
                target=self._committer, args=(loop,), name="tidings-commit", daemon=True
            )
            self._commit_thread.start()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.critical("storage task failed", exc_info=task.exception())
            self.fail(f"storage task failed: {task.exception()!r}")

    def _committer(self, loop: asyncio.AbstractEventLoop) -> None:
        """The committer thread (see the module docstring); any failure is fatal."""
        try:
            self._commit_rounds(loop)
        except Exception as exc:
            loop.call_soon_threadsafe(self.fail, f"fsync failed: {exc!r}")
        finally:
            with self._commit_cond:
                self._commit_dead = True
                self._commit_cond.notify_all()

    def _wait_synced(self, queue: Queue) -> None:
        """Block (on a worker thread) until no commit round has ``queue`` pending or in flight."""
        cond = self._commit_cond
        with cond:
            cond.wait_for(lambda: queue not in self._dirty or self._commit_dead or self._commit_thread is None)
        with self._round_lock:
            pass

    def _commit_rounds(self, loop: asyncio.AbstractEventLoop) -> None:
        always = self.config.fsync is FsyncPolicy.ALWAYS
        cond = self._commit_cond
        while True:
            with cond:
                if always:
                    cond.wait_for(lambda: self._dirty or self._stopping)
                else:
                    cond.wait_for(lambda: self._stopping, timeout=self.config.fsync_interval)
                if self._stopping:
                    return  # aclose() syncs everything itself
            with self._round_lock:
                with cond:
                    # Offsets read here were written before they were counted, so
                    # the fsync below covers them; later appends mark the queue again.
                    batch = [(q, q.log.next_offset) for q in self._dirty]
                    self._dirty.clear()
                    cond.notify_all()  # for _wait_synced
                if not batch:
                    continue
                if len(batch) == 1:
                    batch[0][0].log.sync()
                else:
                    for future in [self._sync_pool.submit(q.log.sync) for q, _ in batch]:
                        future.result()
                # Still under the round lock: queued before _wait_synced's caller resumes.
                loop.call_soon_threadsafe(self._synced, batch, always)

    def _synced(self, batch: list[tuple[Queue, int]], always: bool) -> None:
        """On the loop: the committer synced ``batch``; confirm and deliver."""
        self.fsyncs += len(batch)
        if always and not self._closed:
            for queue, upto in batch:
                queue.commit(upto)

    async def _ticker(self) -> None:
        """Periodic work: redeliveries past their ack wait, cursor persists, dedup pruning."""
        interval = self.config.cursor_flush
        retention_due = time.monotonic() + self.config.retention_check
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now >= retention_due:
                retention_due = now + self.config.retention_check
                self.enforce_retention(int(time.time() * 1000))
            for queue in list(self.queues.values()):  # (a dead letter may create a queue)
                ready = False
                for group in (*queue.groups.values(), *queue.ephemeral):
                    if (group.in_flight or group.delayed) and group.expire(now):
                        ready = True
                if ready:
                    queue.pump_all()
                queue.prune_dedup(now)
            await self.flush_cursors()

    def enforce_retention(self, now_ms: int) -> int:
        """Drop whole segments past each queue's retention (see :mod:`broker.retention`); return the records dropped."""
        return enforce_retention(self, now_ms)

    async def flush_cursors(self) -> None:
        """Persist every durable cursor that changed (write-temp/fsync/rename/fsync-dir)."""
        work: list[tuple[CursorStore, str, str, CursorState]] = []
        for name, queue in self.queues.items():
            for durable, group in queue.groups.items():
                if group.dirty:
                    group.dirty = False
                    work.append((self.cursor_stores[name], name, durable, self.state_of(group)))
        if work:
            loop = asyncio.get_running_loop()
            failed = await loop.run_in_executor(self._cursor_pool, _save_all, work)
            for queue_name, durable in failed:
                # Not fatal: an old cursor on disk only means redeliveries after a
                # crash (R8). Keep it dirty so the next flush tries again.
                owner = self.queues.get(queue_name)
                retry = owner.groups.get(durable) if owner is not None else None
                if retry is not None:
                    retry.dirty = True

    @staticmethod
    def state_of(group: Group) -> CursorState:
        """The persisted form of a durable group's cursor."""
        meta: dict[str, Any] = {
            "events": list(group.filter.patterns),
            # Everything below this was handed out at some point. read_pos alone
            # restarts at the ack floor after a restart, so the offsets marked
            # delivered then (group.deliveries) must count too.
            "delivered": max(group.read_pos, max(group.deliveries, default=-1) + 1),
            "ack_wait": group.ack_wait,
            "max_deliveries": group.max_deliveries,
            "dead_letter": group.dead_letter,
        }
        return CursorState(group.cursor.ack_floor, frozenset(group.cursor.acked), meta)

    def fail(self, reason: str) -> None:
        """Storage can no longer be trusted (a failed fsync: R7): confirm nothing more, stop the broker."""
        if self._fatal:
            return
        self._fatal = True
        logger.critical("storage failure, no more publishes will be confirmed: %s", reason)
        self._on_fatal(reason)

    # --- closing ------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the tasks, sync every queue, persist cursors, close the files."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        thread = self._commit_thread
        if thread is not None:
            with self._commit_cond:
                self._stopping = True
                self._commit_cond.notify()
            await loop.run_in_executor(self._sync_pool, thread.join)  # it may be in an fsync
        if not self._fatal:
            queues = list(self.queues.values())
            try:
                await asyncio.gather(*(loop.run_in_executor(self._sync_pool, q.log.sync) for q in queues))
            except Exception as exc:
                logger.critical("final fsync failed: %s", exc)
            else:
                for queue in queues:
                    queue.commit(queue.log.next_offset)
            await self.flush_cursors()
        for queue in self.queues.values():
            queue.log.close()
        self._sync_pool.shutdown(wait=True)
        self._cursor_pool.shutdown(wait=True)
        self._unlock()


def is_trash(path: Path) -> bool:
    """Is ``path`` (in the queues directory) what an interrupted DELETE left?
    A start removes it. A file with such a name is no queue's: it is left."""
    return path.name.startswith(TRASH_PREFIX) and path.is_dir() and not path.is_symlink()


def group_from_state(queue: Queue, durable: str, state: CursorState) -> Group:
    """Rebuild a durable group from its persisted cursor (start-up and tests; settings: :mod:`broker.durables`)."""
    settings = settings_of(state.meta)
    end = queue.log.next_offset
    if state.ack_floor > end:
        # Acked past the log's end: records it had were lost since (never
        # fsynced with --fsync never, or a last segment file lost with its
        # recovery point). Their offsets go to new messages, which it must
        # not skip as acked.
        logger.warning("queue %s: durable %s had acknowledged up to offset %d, past the log's end (%d): records were "
                       "lost; it goes on from %d", queue.name, durable, state.ack_floor - 1, end, end)  # fmt: skip
        cursor = Cursor(end, set())
    else:
        cursor = Cursor(state.ack_floor, {offset for offset in state.acked if offset < end})
    group = Group(
        queue.name,
        durable,
        settings.events,
        cursor,
        read_pos=max(cursor.ack_floor, queue.log.first_offset),
        ack_wait=settings.ack_wait,
        max_deliveries=settings.max_deliveries,
        dead_letter=settings.dead_letter,
    )
    group.dirty = cursor.ack_floor != state.ack_floor or len(cursor.acked) != len(state.acked)
    # Offsets handed out before the restart but never acked: mark them so
    # the next hand-out says "redelivered" (deliveries >= 2).
    delivered = cursor.ack_floor if settings.delivered is None else settings.delivered
    for offset in range(group.read_pos, min(delivered, queue.log.next_offset)):
        if not cursor.is_acked(offset):
            group.deliveries[offset] = 1
    return group


def _save_all(work: list[tuple[CursorStore, str, str, CursorState]]) -> list[tuple[str, str]]:
    """Save cursors; return the (queue, durable) pairs that could not be saved."""
    failed = []
    for store, queue, name, state in work:
        try:
            store.save(name, state)
        except OSError as exc:
            logger.warning("cannot save cursor %s/%s (will retry): %s", queue, name, exc)
            failed.append((queue, name))
    return failed


def lock_holder(fd: int) -> str:
    """`` (pid N)``: the broker that wrote its pid in the ``LOCK`` open as ``fd``, or "" if none did."""
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f" (pid {holder})" if holder.isdigit() else ""


class DataDirInUse(OSError):
    """Another broker holds the data directory's lock."""
