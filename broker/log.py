"""A queue's append-only log: the segment files of one queue, appends and syncs.

The record format, the checks and the scan that recovers a segment are in
:mod:`broker.segment`; the walk over a queue's segment files when a log is
opened again, in :mod:`broker.recovery`.

Writing
-------
``append`` packs a batch of records into one buffer and writes it with one
``write()`` on the event-loop thread (into the page cache); ``sync`` runs on a
worker thread (or the loop, for a lone publisher's small rounds), calls
``fdatasync`` on every segment written since the last sync, and fsyncs the
directory when a segment was created (R6: create, fsync the file, fsync the
directory before the first confirm in it). A lock guards only the set of
segments to sync, so appends never wait for a sync (but a failed one: see
"A failed write"). Each segment remembers
the end offset its last completed sync covered (``Segment.synced``); appends
write their claims from it, so the claims cost no syscall. A failed sync raises
:class:`LogFailedError` and the log refuses every later call: after a failed
fsync the kernel may have dropped the dirty pages, so a retried fsync proves
nothing (PostgreSQL "fsyncgate"). Syncs of the log take turns (a lock):
the kernel reports one descriptor's writeback error to only one of two
concurrent syncs, so each checks after its own whether another failed
(a roll's seal or a failed write's cut on the loop against a committer
round). A roll fsyncs the old segment and the
directory before creating the next file, so every sealed segment is wholly on
disk, entry included: only the last segment can have an unsynced tail.

A failed write
--------------
A write that fails (ENOSPC) is cut off again with ``ftruncate`` and raised:
the log stays valid, the publishers are answered STORAGE_FULL, and later
appends work once space returns (R7). Guarantee: *a record answered
STORAGE_FULL never comes back*, not even after a power loss. A short write
(some whole records of the batch in the page cache before ENOSPC) needs more
than the truncation for that: the kernel may write those pages back before
the truncation (a committer's fdatasync of the file running at that moment
does), and until a sync covers it the size change is only in memory, so a
power loss could leave them on disk as valid records after the last
synced one, which recovery keeps; a plain publish resent after STORAGE_FULL
would then be stored twice. So when any byte of the batch reached the file,
the cut is fsynced before ``append`` raises, taking its turn with the other
syncs; a failure there is a failed fsync (the log fails, fail-stop). That
costs one fsync per failed write that wrote something, none on the normal
path. A write that put nothing in the file (every publish once the disk is
full: the first ``pwrite`` fails) only cuts the zero tail, unsynced: if a
power loss undoes that, the zeros come back as the end of the data.

Preallocation
-------------
A sync of an append that grew the file must commit the file system's journal
(the new size and blocks); a sync of bytes written over blocks the file
already has writes only the data, and ext4 skips the journal commit (a bare
loop here: overwrite + fdatasync p50 110-131 us, append + fsync 151-173 us;
30-60 us off every lone publisher's round trip). So the last segment is kept *allocated* ahead of
its records: when an append would pass ``Segment.allocated``, zeros are
written from there up to ``extend_bytes`` (1 MiB) further, never past
``segment_bytes``; records then overwrite zeros. Real zero writes, not
``fallocate``: its unwritten extents are converted, a metadata change, on
the first write into them. Invariant: a segment's file holds its records in
``[0, size)`` and zeros in ``[size, allocated)``, and is ``allocated`` bytes
long. A batch that does not fit in one more step, or would pass
``segment_bytes``, is a plain append (the write extends the file, as before).

Why no record in an extension is claimed synced before the extension is
durable: a claim (``Segment.synced``, hence the next records' sync claims and
the recovery point) is set only after an ``fdatasync`` that was called after
the record's ``write()`` returned, and the extension was written before that
record, on the same thread and descriptor. ``fdatasync`` writes all the data
written before it, and the metadata needed to read it back: the file size
and block allocation included (fdatasync(2): "a change to the file size ...
would require a metadata flush"). So the first sync after an extension is a
full one (journal commit plus the zeros: about 2 ms for 1 MiB here, once per
MiB of records) and covers the extension; no separate sync is needed. An
extension that a crash catches unsynced is gone (the file is shorter: none of
its records was claimed) or reads back as zeros or garbage after the last
record, which recovery cuts or keeps as the end of the data
(:mod:`broker.segment`). Writing the zeros costs about 0.35 ms per MiB on the
loop thread (the pwrite into the page cache, measured), once per MiB.

Sealed segments have no zero tail (recovery would read one as damage): a
roll truncates the old segment to its data before fsyncing it. A clean
``close`` truncates the last one too, unsynced: if a power loss undoes that,
the zeros come back and read as the end of the data.

A full disk never refuses what a plain append would have taken: an
extension that fails (ENOSPC) is cut back to where it started and the
append goes on as a plain one; that segment tries again only once its data
has grown by another step. That cut is not synced, and needs none: it drops
only the extension's own zeros, after the end of the records, so whatever a
power loss that undoes it brings back reads as the end of the data (zeros)
or is cut as a torn tail, never as records. A record write that fails is cut back to the end
of the data, which drops the zero tail too (the next append extends again),
durably if any of it was written (see "A failed write").
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import zlib
from bisect import bisect_right
from pathlib import Path
from typing import Final

from . import faults
from .recovery import base_of, durably, every_file_lost, open_fd, recover_segment, segment_files
from .repair import drop_stale
from .segment import SUFFIX, CorruptLogError, LogFailedError, Segment, encode_records, fsync_dir

__all__ = [
    "POINT_FILE", "CorruptLogError", "LogFailedError", "QueueLog", "Segment", "decode_point", "fsync_dir", "read_point",
    "write_point",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: The recovery point file: tag, offset (records below it were fsynced), CRC-32 of both.
POINT_FILE: Final = "recovery-point"
_POINT: Final = struct.Struct(">4sQ")
_POINT_TAG: Final = b"tdrp"
_CRC: Final = struct.Struct(">I")
_crc32 = zlib.crc32
#: Preallocation step (see the module docstring): one journal commit and
#: ~2 ms of sync per MiB of records, against 30-60 us saved on every sync.
EXTEND_BYTES: Final = 1 << 20
_ZEROS: Final = bytes(EXTEND_BYTES)


class QueueLog:
    """The segments of one queue. Appends on one thread, ``sync`` on another.

    Use :meth:`open`; the constructor takes already-scanned segments.
    """

    def __init__(
        self, directory: Path, segments: list[Segment], segment_bytes: int, extend_bytes: int = EXTEND_BYTES
    ) -> None:
        self.directory = directory
        self.segments = segments
        self.segment_bytes = segment_bytes
        self.extend_bytes = extend_bytes
        self._bases = [s.base for s in segments]
        self._lock = threading.Lock()
        #: Held around every fsync of a segment (the committer's rounds, the loop's inline rounds,
        #: a roll's seal): one descriptor's writeback error is reported to only one of two
        #: concurrent syncs, so a sync that succeeds must still see whether the other failed.
        self._sync_lock = threading.RLock()  # re-entrant only for the power-loss model, which syncs within a sync
        self._unsynced: set[Segment] = set()
        self._syncing: set[Segment] = set()
        self._dir_dirty = False
        self._last_ts = max(s.last_ts for s in segments) if segments else 0
        self._failed: str | None = None
        self._closed = False
        self._point = 0  # the recovery point on disk

    @classmethod
    def open(
        cls, directory: Path, *, segment_bytes: int, repair: bool = False, extend_bytes: int = EXTEND_BYTES
    ) -> QueueLog:
        """Open (creating if needed) and recover the log in ``directory``.

        Args:
            directory: the queue's directory.
            segment_bytes: roll a segment once its records reach this size.
            repair: rewrite a damaged segment with lost markers
                (:mod:`broker.repair`) instead of refusing the log.
            extend_bytes: the preallocation step (tests use small ones).

        Raises:
            CorruptLogError: mid-log damage and not ``repair``.
            LogFailedError: a write or fsync of the recovery failed (a cut, the
                unsynced tail's fsync): what is on disk is unknown.
            OSError: the directory or a file cannot be created or read.
        """
        directory.mkdir(parents=True, exist_ok=True)
        if repair:
            drop_stale(directory)
        names = segment_files(directory)
        point = read_point(directory)
        segments: list[Segment] = []
        try:
            for i, path in enumerate(names):
                faults.hit("during_recovery")
                end = None if i == len(names) - 1 else base_of(names[i + 1])
                start = segments[-1].next_offset if segments else base_of(path)
                floor = segments[-1].last_ts if segments else 0
                segment = recover_segment(
                    path, start, end, point=point, repair=repair, floor_ts=floor, segment_bytes=segment_bytes
                )
                if segment is not None:
                    segments.append(segment)
            created = not segments
            if created:
                # A recovery point says records were stored: with no segment file
                # left they were lost (files removed by hand, a restore that missed
                # them). Starting again at 0 would give their offsets to new
                # messages; --repair starts the log where they ended instead.
                base = 0
                if point > 0:
                    if not repair:
                        raise CorruptLogError(directory, None, every_file_lost(point))
                    logger.warning("%s: repair: no segment file, but records below %d had been stored: the log "
                                   "starts again at %d", directory, point, point)  # fmt: skip
                    base = point
                path = directory / f"{base:020d}{SUFFIX}"
                segments.append(Segment(path, open_fd(path), base))
                with durably(f"{directory}: a new segment's entry"):
                    fsync_dir(directory)
            last = segments[-1]
            last.synced = max(last.synced, min(point, last.next_offset))
            if last.synced < last.next_offset or (last.next_offset == last.base and not created):
                # An unclean stop: the tail no record vouches for may still be only in
                # the page cache (kill -9). It is served from now on, so make it durable
                # (entry included), and let the next appends claim it. An empty last
                # segment (a roll whose first write failed, ENOSPC, or was killed) may
                # hold no record but still have an entry no fsync covered: the records
                # confirmed in it next are synced with fdatasync alone (R6).
                with durably(f"{last.path}: the unsynced tail"):
                    os.fsync(last.fd)
                    fsync_dir(directory)
                last.synced = last.next_offset
            if point > last.next_offset:  # (a salvage that did not believe it): the old point would be a false claim
                with durably(f"{directory}: the recovery point"):
                    write_point(directory, last.next_offset)
        except BaseException:
            for s in segments:
                os.close(s.fd)
            raise
        log = cls(directory, segments, segment_bytes, extend_bytes)
        log._point = min(point, last.next_offset)
        return log

    def __repr__(self) -> str:
        return (
            f"<QueueLog {self.directory.name} [{self.first_offset}, {self.next_offset}) {len(self.segments)} segments>"
        )

    # --- properties -------------------------------------------------------

    @property
    def last_ts(self) -> int:
        """The timestamp of the last record (ms), 0 if none: the next is not lower."""
        return self._last_ts

    @property
    def first_offset(self) -> int:
        """The oldest retained offset."""
        return self.segments[0].base

    @property
    def next_offset(self) -> int:
        """The offset the next appended record gets."""
        return self.segments[-1].next_offset

    @property
    def largest_record(self) -> int:
        """The longest record body found in the log when it was opened (see Store.frame_limit)."""
        return max(seg.largest for seg in self.segments)

    @property
    def size_bytes(self) -> int:
        """Bytes of records over every segment (the zero tail not counted)."""
        return sum(s.size for s in self.segments)

    @property
    def failed(self) -> str | None:
        """Why the log refuses work (a failed fsync), or None."""
        return self._failed

    # --- writing ----------------------------------------------------------

    def append(self, bodies: list[bytes], timestamp_ms: int) -> int:
        """Write records for ``bodies`` (not yet synced).

        Returns:
            The offset of the first record.

        Raises:
            LogFailedError: an earlier fsync failed, or the cut of this failed write
                (truncation or fsync: see "A failed write" in the module docstring).
            OSError: the write failed (ENOSPC...); nothing was appended, durably.
        """
        if self._failed is not None:
            raise LogFailedError(f"log {self.directory} failed earlier: {self._failed}")
        seg = self.segments[-1]
        if seg.size >= self.segment_bytes:
            seg = self._roll()
        ts = self._last_ts = max(timestamp_ms, self._last_ts)  # never back in time within a log
        first = seg.next_offset
        data = encode_records(bodies, first, ts, seg.synced)
        start = seg.size
        if start + len(data) > seg.allocated:
            self._extend(seg, start + len(data))
        faults.hit("before_write")
        done = 0  # bytes of data in the file (the page cache) so far
        try:
            if faults.armed("mid_write"):
                done = os.pwrite(seg.fd, data[: len(data) // 2], start)
                faults.hit("mid_write")
            view = memoryview(data)
            while done < len(data):
                done += os.pwrite(seg.fd, view[done:], start + done)
        except OSError:
            self._cut(seg, start, durably=done > 0)
            raise
        end = seg.note_run(first, start, bodies, ts)
        seg.size = end
        seg.allocated = max(seg.allocated, end)
        seg.next_offset = first + len(bodies)
        with self._lock:
            self._unsynced.add(seg)
        faults.hit("after_write_before_sync")
        return first

    def _extend(self, seg: Segment, end: int) -> None:
        """Write zeros so that ``seg`` is allocated up to ``end`` or beyond, if it is worth it.

        Best effort (see Preallocation in the module docstring): when the zeros
        cannot be written, the append goes on as a plain one.
        """
        step = self.extend_bytes
        if end > self.segment_bytes or end - seg.allocated > step or seg.size < seg.extend_from:
            return  # a plain append: the record write extends the file itself
        start, stop = seg.allocated, min(self.segment_bytes, seg.allocated + step)
        try:
            faults.hit("extend")
            _write_zeros(seg.fd, start, stop)
        except OSError as exc:
            seg.extend_from = seg.size + step
            logger.warning("%s: cannot preallocate %d bytes, appending without: %s", seg.path, stop - start, exc)
            with contextlib.suppress(OSError):  # if not, zeros after the data are harmless
                os.ftruncate(seg.fd, start)  # give back what the failed write took
            return
        seg.allocated = stop

    def _cut(self, seg: Segment, size: int, *, durably: bool) -> None:
        """Undo a failed write: cut ``seg`` back to ``size``, the zero tail with it.

        With ``durably`` (some of the batch reached the page cache) the cut is
        fsynced before the caller answers, taking turns with the other syncs of
        the log: see "A failed write" in the module docstring. If the truncation
        or that fsync fails, the log cannot be trusted.

        Raises:
            LogFailedError: the truncation or its fsync failed; the log refuses all later work.
        """
        try:
            os.ftruncate(seg.fd, size)
        except OSError as exc:
            self._failed = f"cannot truncate a failed write: {exc}"
            raise LogFailedError(self._failed) from exc
        seg.allocated = size
        if not durably:
            return  # only zeros were cut: if a power loss undoes that, they read as the end of the data
        with self._sync_lock:
            try:
                os.fsync(seg.fd)
            except OSError as exc:
                self._failed = f"fsync of a cut-off failed write failed: {exc}"
                raise LogFailedError(self._failed) from exc
            if self._failed is not None:  # a sync of this file failed meanwhile: ours proves nothing
                raise LogFailedError(f"log {self.directory} failed: {self._failed}")

    @staticmethod
    def _trim(seg: Segment) -> None:
        """Cut ``seg``'s zero tail (not synced here).

        Raises:
            OSError: the truncation failed.
        """
        if seg.allocated > seg.size:
            os.ftruncate(seg.fd, seg.size)
            seg.allocated = seg.size

    def _roll(self) -> Segment:
        """Start a new segment at the current end (its directory entry is synced by ``sync``).

        The old segment's zero tail is cut (a sealed segment ends with its last
        record), then it is fsynced, here: otherwise the kernel could write
        the new segment back before the old one's tail, and a power loss would
        leave a torn *sealed* segment, which recovery must treat as damage. With
        ``--fsync always`` only the last group's few KiB are still unsynced. The
        directory is fsynced too, so the old segment's own entry is on disk
        before a later one can be: a power loss can then lose only the newest
        segment, never leave a gap between segments (which is damage).

        Raises:
            LogFailedError: the old segment's fsync failed.
            OSError: its zero tail could not be cut; nothing changed, the next append tries again.
        """
        old = self.segments[-1]
        self._trim(old)
        with self._sync_lock:
            try:
                faults.hit("roll_fsync")
                os.fsync(old.fd)
                fsync_dir(self.directory)
            except OSError as exc:
                self._failed = f"fsync failed: {exc}"
                raise LogFailedError(self._failed) from exc
            if self._failed is not None:  # a sync of this file failed meanwhile: ours proves nothing
                raise LogFailedError(f"log {self.directory} failed: {self._failed}")
        path = self.directory / f"{old.next_offset:020d}{SUFFIX}"
        faults.hit("during_segment_roll")
        seg = Segment(path, open_fd(path), old.next_offset)
        self.segments.append(seg)
        self._bases.append(seg.base)
        with self._lock:
            self._dir_dirty = True
            self._unsynced.add(seg)
        return seg

    def sync(self) -> None:
        """fdatasync what was appended so far, and fsync the directory after a roll. Thread-safe.

        ``fdatasync`` covers a changed file size (an extension, a plain
        append): see Preallocation in the module docstring.

        Raises:
            LogFailedError: a sync failed; the log refuses all later work.
        """
        if self._failed is not None:
            raise LogFailedError(f"log {self.directory} failed earlier: {self._failed}")
        with self._lock:
            todo = list(self._unsynced)
            # What each fsync will cover: append sets next_offset after its write.
            marks = [seg.next_offset for seg in todo]
            self._unsynced.clear()
            self._syncing.update(todo)
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            with self._sync_lock:
                faults.hit("sync")
                for seg in todo:
                    _datasync(seg.fd)
                if dir_dirty:
                    fsync_dir(self.directory)
                failed = self._failed  # a roll's fsync of a file we synced failed meanwhile?
        except OSError as exc:
            self._failed = f"fsync failed: {exc}"
            raise LogFailedError(self._failed) from exc
        finally:
            with self._lock:
                self._syncing.difference_update(todo)
        if failed is not None:
            raise LogFailedError(f"log {self.directory} failed: {failed}")
        with self._lock:  # the next appends claim these records (two syncs may overlap: keep the max)
            for seg, mark in zip(todo, marks, strict=True):
                seg.synced = max(seg.synced, mark)
        faults.hit("after_sync_before_confirm")

    # --- reading ----------------------------------------------------------

    def read(self, offset: int, *, max_count: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        """Records ``(offset, timestamp, body)`` from ``offset`` on, within one segment.

        Returns at least one record when ``offset`` is inside the log, even if
        it is bigger than ``max_bytes``, and stops after the record whose body
        takes the total to ``max_bytes`` or past it (see ``Segment.read``); an
        empty list past the end.

        Raises:
            CorruptLogError: a record failed its checks.
        """
        offset = max(offset, self.first_offset)
        if offset >= self.next_offset or max_count <= 0:
            return []
        seg = self.segments[bisect_right(self._bases, offset) - 1]
        return seg.read(offset, max_count, max_bytes)

    def offset_for_time(self, ts_ms: int) -> int:
        """The first offset with a timestamp at or after ``ts_ms`` (the end if none)."""
        for seg in self.segments:
            if seg.last_ts >= ts_ms:
                found = seg.first_at_or_after(ts_ms)
                if found is not None:
                    return found
        return self.next_offset

    # --- retention --------------------------------------------------------

    def seal(self) -> None:
        """Start a new, empty segment now, durably, so that the last one can be
        dropped whole (retention by age of a queue nobody writes to any more).

        Raises:
            LogFailedError: an fsync failed; the log refuses all later work.
            OSError: the old segment's zero tail could not be cut; nothing changed.
        """
        self._roll()
        self.sync()  # the new segment's name is on disk before the old one goes

    def drop_segments_before(self, offset: int) -> int:
        """Delete whole sealed segments that end at or before ``offset``.

        Returns:
            The number of records dropped.
        """
        dropped = 0
        while len(self.segments) > 1 and self.segments[1].base <= offset:
            seg = self.segments[0]
            with self._lock:
                if seg in self._syncing:  # a worker thread is fsyncing it: next time
                    break
                self._unsynced.discard(seg)
            self.segments.pop(0)
            self._bases.pop(0)
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            dropped += seg.next_offset - seg.base
        return dropped

    def close(self) -> None:
        """Close every file (does not sync); first cut the last segment's zero
        tail and save the recovery point if it moved.

        The recovery point is what the last completed fsync covered, so after a
        clean stop (sync, then close) damage anywhere in the log is refused
        (R4), even in records no later record's sync claim vouches for.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._failed is None:
                self._trim(self.segments[-1])
        except OSError as exc:  # the next start reads the zeros as the end of the data
            logger.warning("%s: cannot cut the preallocated tail: %s", self.directory, exc)
        try:
            synced = self.segments[-1].synced
            if self._failed is None and synced > self._point:
                write_point(self.directory, synced)
                self._point = synced
        except OSError as exc:  # only recovery's knowledge is weaker: not worth failing a close
            logger.warning("%s: cannot save the recovery point: %s", self.directory, exc)
        finally:
            for seg in self.segments:
                os.close(seg.fd)


def read_point(directory: Path) -> int:
    """The recovery point saved in ``directory``, or 0 if there is none (or it is damaged)."""
    path = directory / POINT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    offset = decode_point(data)
    if offset is None:
        logger.warning("%s: not a valid recovery point, ignored (recovery will trust only the records)", path)
        return 0
    return offset


def decode_point(data: bytes) -> int | None:
    """The offset a recovery point file's bytes hold, or None if they are not a whole one."""
    if len(data) == _POINT.size + _CRC.size and _CRC.unpack_from(data, _POINT.size)[0] == _crc32(data[: _POINT.size]):
        tag, offset = _POINT.unpack_from(data)
        if tag == _POINT_TAG:
            return int(offset)
    return None


def write_point(directory: Path, offset: int) -> None:
    """Save the recovery point: overwritten in place and fsynced (a torn one is ignored)."""
    path = directory / POINT_FILE
    new = not path.exists()
    data = _POINT.pack(_POINT_TAG, offset)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        _write_all(fd, data + _CRC.pack(_crc32(data)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(directory)


def _datasync(fd: int) -> None:
    """``fdatasync`` where the platform has it (Linux), else ``fsync`` (macOS).

    Looked up per call, so that the power-loss tests' patched ``os`` functions apply.
    """
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _write_zeros(fd: int, start: int, stop: int) -> None:
    """Write zeros over ``[start, stop)`` of ``fd``."""
    while start < stop:
        n = os.pwrite(fd, memoryview(_ZEROS)[: min(EXTEND_BYTES, stop - start)], start)
        start += n


def _write_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        view = view[n:]
        position += n
