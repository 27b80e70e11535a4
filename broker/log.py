"""A queue's append-only log: segment files of self-checking records.

On disk
-------
A queue directory holds segments named by their first offset, 20 digits
(``00000000000000000000.log``), so names sort in offset order. A segment is
a run of records::

    magic u16 | length u32 | offset u64 | timestamp i64 | unsynced u32 | crc32 u32 | body

all big-endian. The CRC covers the 26 header bytes before it and the body, so
a torn length, a wrong offset or a flipped payload bit is always caught (R2).
The body is the stored message as ``protocol.encode_record`` made it; the
broker splices it into DELIVER and BATCH frames without decoding it.

``unsynced`` is the writer's *sync claim*: how many records just before this
one in its segment had not been fsynced yet when it was written. Every
earlier record of the segment had been (an fsync covering it had returned),
so a record at offset ``o`` proves that offsets below ``o - unsynced`` reached
the disk. ``NO_CLAIM`` (2^32 - 1) claims nothing. Beside the segments, the
file ``recovery-point`` (written by a clean :meth:`QueueLog.close`) holds an
offset below which every record was fsynced; it covers the last fsyncs,
which no later record could vouch for.

Writing
-------
``append`` packs a batch of records into one buffer and writes it with one
``write()`` on the event-loop thread (into the page cache); ``sync`` runs on a
worker thread and fsyncs every segment written since the last sync, and the
directory when a segment was created (R6: create, fsync the file, fsync the
directory before the first confirm in it). A lock guards only the set of
segments to sync, so appends never wait for an fsync. Each segment remembers
the end offset its last completed fsync covered (``Segment.synced``); appends
write their claims from it, so the claims cost no syscall. A failed write
(ENOSPC) is cut off again with ``ftruncate`` and raised: the log stays valid
and later appends work once space returns (R7). A failed fsync raises
:class:`LogFailedError` and the log refuses every later call: after a failed
fsync the kernel may have dropped the dirty pages, so a retried fsync proves
nothing (PostgreSQL "fsyncgate"). A roll fsyncs the old segment and the
directory before creating the next file, so every sealed segment is wholly on
disk, entry included: only the last segment can have an unsynced tail.

Reading and recovery
--------------------
Each segment keeps a sparse in-memory index (the file position and timestamp
of every ``INDEX_EVERY``-th record), built by a scan when the log is opened.
Reads ``pread`` from the nearest index entry and verify every record's CRC;
a record that fails is never returned (R4). Opening scans every segment: the
first record that is short, has a bad magic, CRC or offset ends the valid
data. Whether that is a torn write or damage depends on what was synced:

* in a sealed segment it is damage (sealed segments were fsynced whole);
* in the last segment, if the recovery point or the sync claim of any valid
  record after it says the bad record had been fsynced, it is damage too;
* otherwise the bad record was never fsynced: a power loss may drop, tear or
  reorder such writes, so a hole there followed by intact records of the same
  unsynced tail is a torn tail. It is truncated away with a warning naming the
  file and position (R3; zeros read as end of log). Nothing confirmed under
  ``--fsync always`` is cut: a confirm follows an fsync, and the first record
  written after that fsync claims it.

Damage raises :class:`CorruptLogError` naming the file and position, unless
the operator asked for ``repair``, which truncates there and drops later
segments. A log that ends cleanly before the recovery point lost synced
records, which is damage as well.

What a claim cannot cover: the records fsynced by the last fsyncs before an
unclean stop, until a later record or a clean close records it. Damage to
those (a bit flip, not a power loss) is cut as a torn tail, as damage to
the very last record always was.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from array import array
from bisect import bisect_right
from pathlib import Path
from typing import Final

from . import faults

__all__ = ["CorruptLogError", "LogFailedError", "QueueLog", "Segment", "fsync_dir"]

logger = logging.getLogger(__name__)

MAGIC: Final = 0x7D02  # 0x7D "}", then format version 2 (1 had no sync claim)
#: magic, length, offset, timestamp, unsynced (the sync claim): the CRC'd header
_HEAD: Final = struct.Struct(">HIQqI")
_CRC: Final = struct.Struct(">I")
HEADER_SIZE: Final = _HEAD.size + _CRC.size  # 30 bytes
#: Format version 1 (never released): recognised only to refuse it, never to cut it as torn.
MAGIC_V1: Final = 0x7D01
_HEAD_V1: Final = struct.Struct(">HIQq")
#: An ``unsynced`` field value that claims nothing (a claim too far back to fit).
NO_CLAIM: Final = 0xFFFF_FFFF
#: The recovery point file: tag, offset (records below it were fsynced), CRC-32 of both.
POINT_FILE: Final = "recovery-point"
_POINT: Final = struct.Struct(">4sQ")
_POINT_TAG: Final = b"tdrp"
#: One index entry per this many records: 0.5 bytes of memory per record.
INDEX_EVERY: Final = 32
#: Bytes read per ``pread`` when scanning or reading.
READ_CHUNK: Final = 256 * 1024
SUFFIX: Final = ".log"
_pack_head = _HEAD.pack
_unpack_head = _HEAD.unpack_from
_unpack_crc = _CRC.unpack_from
_unpack_claim = struct.Struct(">6xQ8xI").unpack_from  # offset and unsynced of a header
_crc32 = zlib.crc32


class CorruptLogError(Exception):
    """A record in the middle of a log failed its checks: the queue is not served."""

    def __init__(self, path: Path, position: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {position}: {reason}")
        self.path = path
        self.position = position


class LogFailedError(OSError):
    """An fsync failed: nothing written since the last good sync can be trusted."""


def encode_records(bodies: list[bytes], first: int, timestamp_ms: int, synced: int) -> bytes:
    """Frame ``bodies`` as records with offsets from ``first``.

    Args:
        bodies: the stored messages.
        first: the offset of the first record.
        timestamp_ms: every record's timestamp.
        synced: offsets below this (in the same segment) are known to be fsynced:
            each record's sync claim.
    """
    parts: list[bytes] = []
    append = parts.append
    offset = first
    unsynced = first - synced
    step = 1
    if unsynced + len(bodies) >= NO_CLAIM:  # a claim that does not fit: claim nothing (still true)
        unsynced, step = NO_CLAIM, 0
    for body in bodies:
        head = _pack_head(MAGIC, len(body), offset, timestamp_ms, unsynced)
        append(head)
        append(_CRC.pack(_crc32(body, _crc32(head))))
        append(body)
        offset += 1
        unsynced += step
    return b"".join(parts)


def _claim(buf: bytes | memoryview, pos: int) -> int:
    """The offset below which the record at ``buf[pos:]`` (already checked) says all was fsynced."""
    offset, unsynced = _unpack_claim(buf, pos)
    return 0 if unsynced == NO_CLAIM else offset - unsynced


def _check(buf: bytes | memoryview, pos: int, expect: int) -> tuple[int, int, str | None]:
    """Check the record at ``buf[pos:]``.

    Returns:
        ``(length, timestamp, None)`` if it is whole and valid, else ``(0, 0, why)``.
        ``why`` is "short" when the buffer ends inside the record.
    """
    if len(buf) - pos < HEADER_SIZE:
        return 0, 0, "short"
    magic, length, offset, ts, _ = _unpack_head(buf, pos)
    if magic != MAGIC:
        return 0, 0, "bad magic"
    end = pos + HEADER_SIZE + length
    if end > len(buf):
        return 0, 0, "short"
    (crc,) = _unpack_crc(buf, pos + _HEAD.size)
    if _crc32(buf[pos + HEADER_SIZE : end], _crc32(buf[pos : pos + _HEAD.size])) != crc:
        return 0, 0, "bad CRC"
    if offset != expect:
        return 0, 0, f"offset {offset} where {expect} was expected"
    return length, ts, None


class Segment:
    """One segment file: its fd, size, offset range and sparse index.

    Args:
        path: the file (its name gives ``base``).
        fd: an open read/write descriptor.
    """

    __slots__ = ("base", "fd", "last_ts", "next_offset", "path", "positions", "size", "synced", "timestamps")

    def __init__(self, path: Path, fd: int, base: int) -> None:
        self.path = path
        self.fd = fd
        self.base = base
        self.next_offset = base
        self.size = 0
        self.last_ts = 0
        #: Offsets below this are known to be on disk (a completed fsync covered
        #: them): the sync claim of the next append. Written under the log's lock
        #: by ``sync``, read without it by ``append`` (an int, so never torn).
        self.synced = base
        self.positions = array("Q")  # file position of record base + k * INDEX_EVERY
        self.timestamps = array("q")  # its timestamp

    def __repr__(self) -> str:
        return f"<Segment {self.path.name} [{self.base}, {self.next_offset}) {self.size} B>"

    def note(self, offset: int, position: int, ts: int) -> None:
        """Record a new record in the index."""
        if (offset - self.base) % INDEX_EVERY == 0:
            self.positions.append(position)
            self.timestamps.append(ts)
        self.last_ts = ts

    def scan(self, *, last: bool, repair: bool, point: int) -> None:
        """Read the file, build the index, and cut a torn tail (see the module docstring).

        Args:
            last: this is the queue's last segment (sealed ones were fsynced whole).
            repair: truncate at damage instead of raising.
            point: the recovery point: offsets below it were fsynced.

        Raises:
            CorruptLogError: damage that is not a torn tail, and not ``repair``.
        """
        size = os.fstat(self.fd).st_size
        pos = 0
        buf = b""
        buf_start = 0  # file position of buf[0]
        expect = self.base
        last_valid = -1  # position of the last valid record in buf
        why: str | None = None
        while True:
            rel = pos - buf_start
            length, ts, why = _check(buf, rel, expect)
            if why == "short":
                if buf_start + len(buf) >= size:
                    if pos == size:
                        why = None
                    break
                if last_valid >= 0:  # keep its sync claim before buf is replaced
                    self.synced = max(self.synced, _claim(buf, last_valid))
                    last_valid = -1
                need = max(READ_CHUNK, HEADER_SIZE + (_unpack_head(buf, rel)[1] if len(buf) - rel >= _HEAD.size else 0))
                buf = os.pread(self.fd, min(need, size - pos), pos)
                buf_start = pos
                continue
            if why is not None:
                break
            self.note(expect, pos, ts)
            last_valid = rel
            pos += HEADER_SIZE + length
            expect += 1
        if last_valid >= 0:
            self.synced = max(self.synced, _claim(buf, last_valid))
        self.next_offset = expect
        self.size = pos
        if why is None:
            return
        damage = f"{why} (record {expect})"
        if why == "bad magic" and self._is_version_1(pos, size):
            # An older format, not a torn write: never cut a whole segment of it.
            damage = f"record {expect} is in format version 1; this broker reads version {MAGIC & 0xFF}"
        elif not last:
            damage += " in a sealed segment"
        elif point > expect:
            damage += f" below the recovery point {point}: it had been fsynced"
        else:
            intact, proof = self._after(pos, size, expect)
            if proof is not None:
                damage += f"; the record at byte {proof[0]} says records below {proof[1]} had been fsynced"
            else:
                if _all_zero(self.fd, pos, size):
                    logger.warning("%s: %d zero bytes after the last record read as end of log", self.path, size - pos)
                else:
                    logger.warning(
                        "%s: torn tail (never fsynced): cutting %d bytes from byte %d on: %s; %d intact records after it",
                        self.path, size - pos, pos, damage, intact,
                    )  # fmt: skip
                self._truncate(pos)
                return
        if not repair:
            raise CorruptLogError(self.path, pos, damage)
        logger.warning("%s: repair: cutting %d bytes from byte %d on: %s", self.path, size - pos, pos, damage)
        self._truncate(pos)

    def _is_version_1(self, pos: int, size: int) -> bool:
        """Is a whole, CRC-valid record of format version 1 at ``pos``?"""
        head = os.pread(self.fd, _HEAD_V1.size + _CRC.size, pos)
        if len(head) < _HEAD_V1.size + _CRC.size or _HEAD_V1.unpack_from(head)[0] != MAGIC_V1:
            return False
        length = _HEAD_V1.unpack_from(head)[1]
        if pos + len(head) + length > size:
            return False
        body = os.pread(self.fd, length, pos + len(head))
        (crc,) = _unpack_crc(head, _HEAD_V1.size)
        return bool(_crc32(body, _crc32(head[: _HEAD_V1.size])) == crc)

    def _truncate(self, pos: int) -> None:
        """Cut the file at ``pos`` for good: everything left is then on disk."""
        os.ftruncate(self.fd, pos)
        os.fsync(self.fd)
        self.synced = self.next_offset

    def _after(self, pos: int, size: int, expect: int) -> tuple[int, tuple[int, int] | None]:
        """The whole valid records with later offsets after the bad record at ``pos``.

        Returns:
            How many there are, and the (position, claim) of the first one whose
            sync claim covers ``expect`` (the bad record had been fsynced), or None.
        """
        tail = os.pread(self.fd, size - pos, pos)
        needle = MAGIC.to_bytes(2, "big")
        intact = 0
        at = tail.find(needle, 1)
        while at != -1:
            nxt = at + 1
            offset = _unpack_head(tail, at)[2] if len(tail) - at >= HEADER_SIZE else expect
            if offset > expect:
                length, _, why = _check(tail, at, offset)
                if why is None:
                    intact += 1
                    claim = _claim(tail, at)
                    if claim > expect:
                        return intact, (pos + at, claim)
                    nxt = at + HEADER_SIZE + length  # not into its body: a payload may hold record bytes
            at = tail.find(needle, nxt)
        return intact, None

    def read(self, offset: int, max_count: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        """Up to ``max_count`` records from ``offset`` (at least one, at most ~``max_bytes``).

        Raises:
            CorruptLogError: a record failed its CRC or offset check.
        """
        end_offset = min(self.next_offset, offset + max_count)
        if offset >= end_offset:
            return []
        slot = (offset - self.base) // INDEX_EVERY
        pos = self.positions[slot]
        current = self.base + slot * INDEX_EVERY
        out: list[tuple[int, int, bytes]] = []
        got = 0
        buf = b""
        rel = 0
        while current < end_offset:
            if len(buf) - rel < HEADER_SIZE or len(buf) - rel < HEADER_SIZE + _unpack_head(buf, rel)[1]:
                need = READ_CHUNK
                if len(buf) - rel >= _HEAD.size:
                    need = max(need, HEADER_SIZE + _unpack_head(buf, rel)[1])
                buf = os.pread(self.fd, min(need, self.size - pos), pos)
                rel = 0
            length, ts, why = _check(buf, rel, current)
            if why is not None:
                raise CorruptLogError(self.path, pos, f"{why} (record {current})")
            if current >= offset:
                out.append((current, ts, bytes(buf[rel + HEADER_SIZE : rel + HEADER_SIZE + length])))
                got += length
                if got >= max_bytes:
                    break
            step = HEADER_SIZE + length
            rel += step
            pos += step
            current += 1
        return out

    def first_at_or_after(self, ts_ms: int) -> int | None:
        """The first offset whose timestamp is >= ``ts_ms``, or None if none here."""
        if self.next_offset == self.base or self.last_ts < ts_ms:
            return None
        slot = max(0, bisect_right(self.timestamps, ts_ms - 1) - 1)
        start = self.base + slot * INDEX_EVERY
        while start < self.next_offset:
            for offset, ts, _ in self.read(start, INDEX_EVERY, READ_CHUNK):
                if ts >= ts_ms:
                    return offset
                start = offset + 1
        return None


def _all_zero(fd: int, start: int, end: int) -> bool:
    while start < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - start), start)
        if not chunk or chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


def _open_fd(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class QueueLog:
    """The segments of one queue. Appends on one thread, ``sync`` on another.

    Use :meth:`open`; the constructor takes already-scanned segments.
    """

    def __init__(self, directory: Path, segments: list[Segment], segment_bytes: int) -> None:
        self.directory = directory
        self.segments = segments
        self.segment_bytes = segment_bytes
        self._bases = [s.base for s in segments]
        self._lock = threading.Lock()
        self._unsynced: set[Segment] = set()
        self._syncing: set[Segment] = set()
        self._dir_dirty = False
        self._last_ts = max(s.last_ts for s in segments) if segments else 0
        self._failed: str | None = None
        self._closed = False
        self._point = 0  # the recovery point on disk

    @classmethod
    def open(cls, directory: Path, *, segment_bytes: int, repair: bool = False) -> QueueLog:
        """Open (creating if needed) and recover the log in ``directory``.

        Raises:
            CorruptLogError: mid-log damage and not ``repair``.
            OSError: the directory or a file cannot be created or read.
        """
        directory.mkdir(parents=True, exist_ok=True)
        names = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and p.name[:-4].isdigit())
        point = _read_point(directory)
        segments: list[Segment] = []
        try:
            for i, path in enumerate(names):
                faults.hit("during_recovery")
                segment = Segment(path, _open_fd(path), int(path.name[: -len(SUFFIX)]))
                if segments and segment.base != segments[-1].next_offset:
                    gap = f"starts at offset {segment.base}, the previous segment ends at {segments[-1].next_offset}"
                    os.close(segment.fd)
                    if not repair:
                        raise CorruptLogError(path, 0, gap)
                    logger.warning("%s: repair: dropping it and %d later segments: %s", path, len(names) - i - 1, gap)
                    for later in names[i:]:
                        later.unlink()
                    fsync_dir(directory)
                    break
                segments.append(segment)
                segment.scan(last=i == len(names) - 1, repair=repair, point=point)
            if segments and point > segments[-1].next_offset:
                # Synced records are missing at the end (a truncated or lost file).
                last = segments[-1]
                why = f"the log ends at record {last.next_offset}, but records below {point} had been fsynced"
                if not repair:
                    raise CorruptLogError(last.path, last.size, why)
                logger.warning("%s: repair: %s", last.path, why)
        except BaseException:
            for s in segments:
                os.close(s.fd)
            raise
        if not segments:
            path = directory / f"{0:020d}{SUFFIX}"
            segments.append(Segment(path, _open_fd(path), 0))
            fsync_dir(directory)
        last = segments[-1]
        last.synced = max(last.synced, min(point, last.next_offset))
        if last.synced < last.next_offset:
            # An unclean stop: the tail no record vouches for may still be only in
            # the page cache (kill -9). It is served from now on, so make it durable
            # (entry included), and let the next appends claim it.
            os.fsync(last.fd)
            fsync_dir(directory)
            last.synced = last.next_offset
        log = cls(directory, segments, segment_bytes)
        if point > last.next_offset:  # repaired below it: the old point would be a false claim now
            _write_point(directory, last.next_offset)
        log._point = min(point, last.next_offset)
        return log

    def __repr__(self) -> str:
        return (
            f"<QueueLog {self.directory.name} [{self.first_offset}, {self.next_offset}) {len(self.segments)} segments>"
        )

    # --- properties -------------------------------------------------------

    @property
    def first_offset(self) -> int:
        """The oldest retained offset."""
        return self.segments[0].base

    @property
    def next_offset(self) -> int:
        """The offset the next appended record gets."""
        return self.segments[-1].next_offset

    @property
    def size_bytes(self) -> int:
        """Bytes on disk over every segment."""
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
            LogFailedError: an earlier fsync failed.
            OSError: the write failed (ENOSPC...); nothing was appended.
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
        faults.hit("before_write")
        try:
            if faults.armed("mid_write"):
                os.pwrite(seg.fd, data[: len(data) // 2], start)
                faults.hit("mid_write")
            _write_all(seg.fd, data, start)
        except OSError:
            self._cut(seg, start)
            raise
        pos = start
        offset = first
        for body in bodies:
            seg.note(offset, pos, ts)
            pos += HEADER_SIZE + len(body)
            offset += 1
        seg.size = pos
        seg.next_offset = offset
        with self._lock:
            self._unsynced.add(seg)
        faults.hit("after_write_before_sync")
        return first

    def _cut(self, seg: Segment, size: int) -> None:
        """Undo a partial write; if even that fails the log cannot be trusted."""
        try:
            os.ftruncate(seg.fd, size)
        except OSError as exc:
            self._failed = f"cannot truncate a failed write: {exc}"
            raise LogFailedError(self._failed) from exc

    def _roll(self) -> Segment:
        """Start a new segment at the current end (its directory entry is synced by ``sync``).

        The old segment is fsynced first, here: otherwise the kernel could write
        the new segment back before the old one's tail, and a power loss would
        leave a torn *sealed* segment, which recovery must treat as damage. With
        ``--fsync always`` only the last group's few KiB are still unsynced. The
        directory is fsynced too, so the old segment's own entry is on disk
        before a later one can be: a power loss can then lose only the newest
        segment, never leave a gap between segments (which is damage).
        """
        old = self.segments[-1]
        try:
            os.fsync(old.fd)
            fsync_dir(self.directory)
        except OSError as exc:
            self._failed = f"fsync failed: {exc}"
            raise LogFailedError(self._failed) from exc
        path = self.directory / f"{old.next_offset:020d}{SUFFIX}"
        faults.hit("during_segment_roll")
        seg = Segment(path, _open_fd(path), old.next_offset)
        self.segments.append(seg)
        self._bases.append(seg.base)
        with self._lock:
            self._dir_dirty = True
            self._unsynced.add(seg)
        return seg

    def sync(self) -> None:
        """fsync what was appended so far, and the directory after a roll. Thread-safe.

        Raises:
            LogFailedError: an fsync failed; the log refuses all later work.
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
            faults.hit("sync")
            for seg in todo:
                os.fsync(seg.fd)
            if dir_dirty:
                fsync_dir(self.directory)
        except OSError as exc:
            self._failed = f"fsync failed: {exc}"
            raise LogFailedError(self._failed) from exc
        finally:
            with self._lock:
                self._syncing.difference_update(todo)
        with self._lock:  # the next appends claim these records (two syncs may overlap: keep the max)
            for seg, mark in zip(todo, marks, strict=True):
                seg.synced = max(seg.synced, mark)
        faults.hit("after_sync_before_confirm")

    # --- reading ----------------------------------------------------------

    def read(self, offset: int, *, max_count: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        """Records ``(offset, timestamp, body)`` from ``offset`` on, within one segment.

        Returns at least one record when ``offset`` is inside the log, even if
        it is bigger than ``max_bytes``; an empty list past the end.

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
        """Close every file (does not sync); first save the recovery point if it moved.

        The recovery point is what the last completed fsync covered, so after a
        clean stop (sync, then close) damage anywhere in the log is refused
        (R4), even in records no later record's sync claim vouches for.
        """
        if self._closed:
            return
        self._closed = True
        try:
            synced = self.segments[-1].synced
            if self._failed is None and synced > self._point:
                _write_point(self.directory, synced)
                self._point = synced
        except OSError as exc:  # only recovery's knowledge is weaker: not worth failing a close
            logger.warning("%s: cannot save the recovery point: %s", self.directory, exc)
        finally:
            for seg in self.segments:
                os.close(seg.fd)


def _read_point(directory: Path) -> int:
    """The recovery point saved in ``directory``, or 0 if there is none (or it is damaged)."""
    path = directory / POINT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) == _POINT.size + _CRC.size and _unpack_crc(data, _POINT.size)[0] == _crc32(data[: _POINT.size]):
        tag, offset = _POINT.unpack_from(data)
        if tag == _POINT_TAG:
            return int(offset)
    logger.warning("%s: not a valid recovery point, ignored (recovery will trust only the records)", path)
    return 0


def _write_point(directory: Path, offset: int) -> None:
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


def _write_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, position)
        view = view[n:]
        position += n
