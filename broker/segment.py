"""The records of a queue's log and one segment file of them: format, checks, scan, reads.

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
file ``recovery-point`` (written by a clean ``QueueLog.close``) holds an
offset below which every record was fsynced; it covers the last fsyncs,
which no later record could vouch for.

Reading and recovery
--------------------
Each segment keeps a sparse in-memory index (the file position and timestamp
of every ``INDEX_EVERY``-th record), built by a scan when the log is opened.
Reads ``pread`` from the nearest index entry, ``READ_CHUNK`` bytes at a time
(a record longer than that, up to the frame limit, is read whole), and
verify every record's CRC; a record that fails is never returned (R4).
Opening scans every segment the same way: the first record that is short,
has a bad magic, CRC or offset ends the valid data. Whether that is a torn
write or damage depends on what was synced:

* in a sealed segment it is damage (sealed segments were fsynced whole);
* in the last segment, if the recovery point or the sync claim of any valid
  record after it says the bad record had been fsynced, it is damage too;
* otherwise no fsync is known to have covered the bad record (a crash's
  last fsyncs are recorded nowhere): it is taken for an unsynced write, which
  a power loss may drop, tear or reorder, so a hole there followed by intact
  records of the same unsynced tail is a torn tail. It is truncated away with
  a warning naming the file and position (R3); ``scan(cut=False)`` only
  reports it (``tidings-broker --check``, which changes no file). Nothing
  confirmed under ``--fsync always`` is cut:
  a confirm follows an fsync, and the first record written after that fsync
  claims it.

The preallocated tail
---------------------
The last segment is extended ahead of its records with zeros (see
:mod:`broker.log`), so after a kill -9 or a power loss it normally ends in a
run of zeros after its last record. That is the end of the data and no
damage: ``scan`` keeps it silently (``Segment.allocated`` is then the file
size; appends continue at ``Segment.size``, the end of the data). Only a tail
that is *all* zeros counts; zeros after a torn record, or zeros and then
intact records (a page that never reached the disk), follow the torn-tail
rules above. Sealed segments never have a zero tail: a roll truncates the old
segment to its data before fsyncing it, so zeros there are damage.

Damage raises :class:`CorruptLogError` naming the file and position (what
``--repair`` then does is in :mod:`broker.repair`). A log that ends cleanly
before the recovery point lost synced records, which is damage as well.

What a claim cannot cover: the records fsynced by the last fsyncs before an
unclean stop, until a later record or a clean close records it. Damage to
those (a bit flip, not a power loss) is cut as a torn tail, as damage to
the very last record always was.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Final

from protocol.wording import many

__all__ = [
    "HEADER_SIZE", "MAGIC", "CorruptLogError", "Segment", "TornTail", "check_any", "encode_records", "for_clients",
    "fsync_dir",
]  # fmt: skip

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
#: One index entry per this many records: 0.5 bytes of memory per record.
INDEX_EVERY: Final = 32
#: Bytes read per ``pread`` when scanning or reading (a longer record is read whole: see ``_read_from``).
READ_CHUNK: Final = 256 * 1024
SUFFIX: Final = ".log"
_pack_head = _HEAD.pack
_unpack_head = _HEAD.unpack_from
_unpack_crc = _CRC.unpack_from
_unpack_claim = struct.Struct(">6xQ8xI").unpack_from  # offset and unsynced of a header
_unpack_start = struct.Struct(">HI").unpack_from  # magic and length of a header
_crc32 = zlib.crc32


class LogFailedError(OSError):
    """An fsync (or a write that recovery must make durable) failed: nothing
    written since the last good sync can be trusted, so the log is not used again."""


def for_clients(exc: BaseException, queues_dir: Path) -> str:
    """``exc``'s message as clients are told it: file paths relative to the
    queues directory (``DB/00000000000000000000.log``). Where the data lives
    is the operator's business: the broker's log names the full path."""
    return str(exc).replace(f"{queues_dir}{os.sep}", "")


class CorruptLogError(Exception):
    """A record in the middle of a log failed its checks: the queue is not served."""

    def __init__(self, path: Path, position: int | None, reason: str) -> None:
        """``position``: the byte of the record that failed; None for damage that is no one record's (a missing file)."""
        super().__init__(
            f"{path}: {reason}" if position is None else f"{path}: corrupt record at byte {position}: {reason}"
        )
        self.path = path
        self.position = position
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TornTail:
    """A torn tail that a scan found: what a start-up cuts (``Segment.scan`` with ``cut``)."""

    path: Path
    #: Where the cut goes: the first byte after the last valid record.
    position: int
    #: Bytes from there to the end of the file.
    length: int
    #: What was wrong with the first bad record ("bad CRC (record 12)").
    why: str
    #: Whole valid records with later offsets after it (none of them claims it was fsynced).
    intact: int


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


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _claim(buf: bytes | memoryview, pos: int) -> int:
    """The offset below which the record at ``buf[pos:]`` (already checked) says all was fsynced."""
    offset, unsynced = _unpack_claim(buf, pos)
    return 0 if unsynced == NO_CLAIM else offset - unsynced


def _check(buf: bytes | memoryview | mmap.mmap, pos: int, expect: int, crc: bool = True) -> tuple[int, int, str | None]:
    """Check the record at ``buf[pos:]``; with ``crc`` False only its header (a read
    stepping over records on its way to a later offset, so that a damaged record's
    body does not hide the records after it).

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
    if crc:
        (stored,) = _unpack_crc(buf, pos + _HEAD.size)
        if _crc32(buf[pos + HEADER_SIZE : end], _crc32(buf[pos : pos + _HEAD.size])) != stored:
            return 0, 0, "bad CRC"
    if offset != expect:
        return 0, 0, f"offset {offset} where {expect} was expected"
    return length, ts, None


def check_any(buf: bytes | mmap.mmap, pos: int) -> tuple[int, int, int] | None:
    """``(offset, timestamp, length)`` of a whole valid record at ``buf[pos:]``, whatever its offset, or None."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    offset = _unpack_head(buf, pos)[2]
    length, ts, why = _check(buf, pos, offset)
    return None if why is not None else (offset, ts, length)


class Segment:
    """One segment file: its fd, data size, allocated size, offset range and sparse index.

    Args:
        path: the file (its name gives ``base``).
        fd: an open read/write descriptor.
    """

    __slots__ = (
        "allocated", "base", "extend_from", "fd", "largest", "last_ts", "next_offset", "path", "positions", "size",
        "synced", "timestamps",
    )  # fmt: skip

    def __init__(self, path: Path, fd: int, base: int) -> None:
        self.path = path
        self.fd = fd
        self.base = base
        self.next_offset = base
        #: The end of the records: where the next one goes. Every reader of the
        #: data (reads, retention, STATUS) uses this, never the file size.
        self.size = 0
        #: The file size: zeros from ``size`` to here (the preallocated tail).
        self.allocated = 0
        #: No preallocation until ``size`` reaches this (set after one failed).
        self.extend_from = 0
        self.last_ts = 0
        #: Offsets below this are known to be on disk (a completed fsync covered
        #: them): the sync claim of the next append. Written under the log's lock
        #: by ``sync``, read without it by ``append`` (an int, so never torn).
        self.synced = base
        #: The longest record body the recovery scan found (records appended
        #: since fit the frame limit of the broker that appended them).
        self.largest = 0
        self.positions = array("Q")  # file position of record base + k * INDEX_EVERY
        self.timestamps = array("q")  # its timestamp

    def __repr__(self) -> str:
        return f"<Segment {self.path.name} [{self.base}, {self.next_offset}) {self.size}/{self.allocated} B>"

    def note(self, offset: int, position: int, ts: int) -> None:
        """Record a new record in the index."""
        if (offset - self.base) % INDEX_EVERY == 0:
            self.positions.append(position)
            self.timestamps.append(ts)
        self.last_ts = ts

    def note_run(self, first: int, start: int, bodies: list[bytes], ts: int) -> int:
        """Record new records in the index: :meth:`note` for each of a run.

        Args:
            first: the offset of the first record.
            start: its file position (the others follow it).
            bodies: the records' bodies.
            ts: their timestamp.

        Returns:
            The file position after the last record.
        """
        # Body bytes before each record, in C; positions only for the indexed ones.
        before = list(accumulate(map(len, bodies), initial=start))
        k = -(first - self.base) % INDEX_EVERY  # the first record to index
        picked = [before[i] + i * HEADER_SIZE for i in range(k, len(bodies), INDEX_EVERY)]
        if picked:
            self.positions.extend(picked)
            self.timestamps.extend([ts] * len(picked))
        self.last_ts = ts
        return before[-1] + len(bodies) * HEADER_SIZE

    def scan(self, *, last: bool, point: int, cut: bool = True) -> TornTail | None:
        """Read the file, build the index, and cut a torn tail (see the module docstring).

        Args:
            last: this is the queue's last segment (sealed ones were fsynced whole).
            point: the recovery point: offsets below it were fsynced.
            cut: cut a torn tail (start-up); False leaves the file as it is
                (``tidings-broker --check``: the descriptor may be read-only).
                The segment then ends where the cut would be all the same.

        Returns:
            The torn tail found (cut or not), or None.

        Raises:
            CorruptLogError: damage that is not a torn tail.
        """
        size = os.fstat(self.fd).st_size
        pos = 0
        buf = b""
        buf_start = -1  # file position of buf[0] (nothing read yet)
        expect = self.base
        last_valid = -1  # position of the last valid record in buf
        largest = 0
        why: str | None = None
        while True:
            rel = pos - buf_start
            length, ts, why = _check(buf, rel, expect)
            if why == "short":
                if buf_start + len(buf) >= size:
                    if pos == size:
                        why = None
                    break
                if buf_start == pos:  # read from here already: the file was cut meanwhile
                    size = pos + len(buf)  # (it ends where that read did; re-reading would loop)
                    continue
                if last_valid >= 0:  # keep its sync claim before buf is replaced
                    self.synced = max(self.synced, _claim(buf, last_valid))
                    last_valid = -1
                buf = _read_from(self.fd, pos, size)
                buf_start = pos
                continue
            if why is not None:
                break
            self.note(expect, pos, ts)
            last_valid = rel
            pos += HEADER_SIZE + length
            expect += 1
            if length > largest:
                largest = length
        if last_valid >= 0:
            self.synced = max(self.synced, _claim(buf, last_valid))
        self.largest = largest
        self.next_offset = expect
        self.size = self.allocated = pos
        if why is None:
            return None
        if last and point <= expect and _all_zero(self.fd, pos, size):
            # The preallocated tail (no record can follow a run of zeros to the end).
            logger.debug("%s: %d preallocated zero bytes after the last record, kept", self.path, size - pos)
            self.allocated = size
            return None
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
                torn = TornTail(self.path, pos, size - pos, damage, intact)
                if cut:
                    logger.warning(
                        "%s: torn tail (no fsync known to cover it): cutting %s from byte %d on: %s; %s after it",
                        self.path, many(torn.length, "byte"), pos, damage, many(intact, "intact record"),
                    )  # fmt: skip
                    self._truncate(pos)
                return torn
        raise CorruptLogError(self.path, pos, damage)

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
        """Cut the file at ``pos`` for good (the preallocation too): everything left is then on disk.

        Raises:
            LogFailedError: the cut or its fsync failed (what is on disk is unknown).
        """
        try:
            os.ftruncate(self.fd, pos)
            os.fsync(self.fd)
        except OSError as exc:
            raise LogFailedError(f"{self.path}: cannot cut at byte {pos}: {exc}") from exc
        self.synced = self.next_offset
        self.allocated = pos

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
            record = check_any(tail, at)
            if record is not None and record[0] > expect:
                intact += 1
                claim = _claim(tail, at)
                if claim > expect:
                    return intact, (pos + at, claim)
                nxt = at + HEADER_SIZE + record[2]  # not into its body: a payload may hold record bytes
            at = tail.find(needle, nxt)
        return intact, None

    def read(self, offset: int, max_count: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        """Up to ``max_count`` records from ``offset``: at least one, and none
        after the one whose body takes the total past ``max_bytes`` (so at most
        ``max_bytes`` plus one record's body; a bound on memory, not on frames).

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
                buf = _read_from(self.fd, pos, self.size)
                rel = 0
            length, ts, why = _check(buf, rel, current, current >= offset)  # stepped over: header only
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


def _read_from(fd: int, pos: int, end: int) -> bytes:
    """The bytes of ``fd`` from ``pos`` on, never past ``end``: ``READ_CHUNK``
    of them, or more when the record that starts at ``pos`` is longer.

    A legal record can be longer than a chunk (as large as the frame limit,
    1 MiB by default), and a read that stopped inside it would take it for
    a short, damaged one. So when the header says the record goes on past
    the chunk, a second ``pread`` reads the rest of it; small records still
    cost one ``pread`` per chunk. A header with a bad magic is not followed
    (its length means nothing); a good magic with a wrong length reads up to
    ``end`` at most, and the record's check then fails.
    """
    buf = os.pread(fd, min(READ_CHUNK, end - pos), pos)
    if len(buf) >= _HEAD.size:
        magic, length = _unpack_start(buf)
        want = min(HEADER_SIZE + length, end - pos)
        if magic == MAGIC and want > len(buf):
            buf += os.pread(fd, want - len(buf), pos + len(buf))
    return buf


def _all_zero(fd: int, start: int, end: int) -> bool:
    while start < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - start), start)
        if not chunk or chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True
