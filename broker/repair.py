"""What ``--repair`` does to a damaged log: keep every intact record, mark each lost one.

Damage (see :mod:`broker.segment`) ends the valid data of a segment at a
bad record, but the records after it usually are intact: a flipped byte
spoils one record, a lost sector a few. Records carry their own offsets
and CRCs, so they can be found again after the damage. :func:`salvage`
rewrites one segment file so that it holds every offset of its range, in
order, exactly once:

* each whole record with a good CRC whose offset is the next one wanted,
  or later, is kept as it is (its bytes are copied; its sync claim stays
  true, since the new file is fsynced whole);
* each offset that no such record holds gets a *lost marker*: a record
  with event :data:`protocol.LOST_EVENT` (``tidings.lost``), no headers and
  a string payload saying what happened. Every subscriber gets it whatever
  its event filter (the lost message may have matched it), so a loss is
  never silent, and the offsets stay dense: nothing after the damage moves,
  and no durable cursor points at a different message than before.

A record's bytes are searched for by the magic after the damage; a valid
record with an offset already taken (or below the range) is stepped over
whole, so a payload that happens to hold record bytes is not mistaken for
records unless it follows damage directly. What is lost is only what the
damage itself took.

The new file is written beside the old one (``<name>.repair``), fsynced,
renamed over it and the directory fsynced, so a crash leaves either the old
file (repair runs again at the next start) or the new one; a stale
``.repair`` file is removed at the next open (:func:`drop_stale`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

from protocol import LOST_EVENT, encode_record
from protocol.wording import many

from .segment import HEADER_SIZE, MAGIC, SUFFIX, CorruptLogError, check_any, encode_records, fsync_dir

__all__ = ["TEMP_SUFFIX", "drop_stale", "lost_marker", "salvage"]

logger = logging.getLogger(__name__)

TEMP_SUFFIX: Final = ".repair"
_NEEDLE: Final = MAGIC.to_bytes(2, "big")


def lost_marker(why: str, timestamp_ms: int) -> bytes:
    """The record body that stands for a lost message."""
    return encode_record(LOST_EVENT, timestamp_ms, None, why)


def drop_stale(directory: Path) -> None:
    """Remove what a repair interrupted by a crash left (the old file is still in place)."""
    for stale in directory.glob(f"*{SUFFIX}{TEMP_SUFFIX}"):
        logger.warning("%s: removing an unfinished repair's file", stale)
        stale.unlink()


def _intact(buf: bytes | mmap.mmap, start: int, end: int | None, base: int) -> Iterator[tuple[int, int, int, int]]:
    """The records to keep: ``(offset, timestamp, position, length)`` in file order, offsets rising from ``start``.

    A record is taken only if the offsets it passes over could have been in
    the bytes it passes over (a record takes at least ``HEADER_SIZE``), or
    if it opens the file at the offset the file is named after: a record
    that checks but has a wild offset (garbage that happens to pass, or a
    hostile file) is not believed, so it cannot ask for millions of markers.
    """
    want, pos, since = start, 0, 0
    size = len(buf)
    while pos < size:
        record = check_any(buf, pos)
        if record is not None:
            offset, timestamp, length = record
            if offset < want or (end is not None and offset >= end):  # already held, or the next file's
                pos = since = pos + HEADER_SIZE + length  # never into a whole record's body
                continue
            if (offset - want) * HEADER_SIZE <= pos - since or (pos == 0 and offset == base):
                yield offset, timestamp, pos, HEADER_SIZE + length
                want = offset + 1
                pos = since = pos + HEADER_SIZE + length
                continue
        pos = buf.find(_NEEDLE, pos + 1)
        if pos == -1:
            return


class _Rewrite:
    """The new file of a salvage, written front to back: kept records and markers."""

    def __init__(self, out: BinaryIO, start: int, floor_ts: int, note: str, limit: int) -> None:
        self.out = out
        self.next = start  # the next offset to write
        self.ts = floor_ts  # the timestamp of the last record written (0: none yet)
        self.note = note
        self.limit = limit
        self.kept = self.lost = 0

    def keep(self, offset: int, timestamp: int, raw: bytes) -> None:
        """Write an intact record (its bytes as they are), marking the offsets before it lost."""
        self.mark_to(offset, timestamp)
        self.out.write(raw)
        self.kept += 1
        self.next, self.ts = offset + 1, timestamp

    def mark_to(self, offset: int, later_ts: int) -> None:
        """Write a lost marker for each offset from ``next`` to ``offset``.

        Raises:
            _TooMany: more markers than one segment's bytes could have held records.
        """
        count = offset - self.next
        if count <= 0:
            return
        if count > self.limit:
            raise _TooMany(count)
        ts = self.ts or later_ts or int(time.time() * 1000)  # the record before's: timestamps stay in order
        self.out.write(encode_records([lost_marker(self.note, ts)] * count, self.next, ts, self.next))
        self.lost += count
        self.next = offset


class _TooMany(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def salvage(
    path: Path, start: int, end: int | None, fill_to: int, why: str, floor_ts: int, segment_bytes: int
) -> Path | None:
    """Rewrite the segment at ``path`` to hold offsets ``[start, end)`` densely (see the module docstring).

    Args:
        path: the damaged segment (or one that does not start where the log goes on).
        start: the first offset it must hold (it is renamed after it).
        end: the offset the next segment starts at; None for the last segment.
        fill_to: for the last segment, lost markers go at least up to here
            (the recovery point: offsets below it had been stored).
        why: what was wrong, for the log and the markers.
        floor_ts: the timestamp of the log's record before ``start`` (0: none).
        segment_bytes: the segment size: no run of lost records is longer
            than two segments of the smallest records.

    Returns:
        The new file, or None when it would hold nothing and is removed.

    Raises:
        CorruptLogError: the markers needed are more than a segment could have
            held (a file name or the recovery point is wrong): not repaired.
        OSError: a read, write, rename or fsync failed.
    """
    directory = path.parent
    target = directory / f"{start:020d}{SUFFIX}"
    temp = directory / (target.name + TEMP_SUFFIX)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    note = f"lost to damage in {path.name} ({why}); replaced by tidings-broker --repair at {stamp}"
    size = path.stat().st_size
    limit = 2 * max(segment_bytes, size) // HEADER_SIZE
    try:
        with path.open("rb") as f, temp.open("wb") as out:
            new = _Rewrite(out, start, floor_ts, note, limit)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"") as buf:
                for offset, timestamp, pos, length in _intact(buf, start, end, int(path.name[: -len(SUFFIX)])):
                    new.keep(offset, timestamp, buf[pos : pos + length])
            try:
                new.mark_to(fill_to if end is None else end, 0)
            except _TooMany as exc:
                if end is not None:
                    raise
                logger.warning("%s: repair: not marking %d records up to the recovery point %d: more than a "
                               "segment could hold; the recovery point is wrong", path, exc.count, fill_to)  # fmt: skip
            out.flush()
            os.fsync(out.fileno())
    except _TooMany as exc:
        temp.unlink()
        raise CorruptLogError(path, 0, f"cannot repair ({why}): {exc.count} records would be marked lost, more "
                              "than a segment could have held; a file name is wrong") from None  # fmt: skip
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    logger.warning(
        "%s: repair (%s): kept %s; %s now %s; it holds offsets %d to %d",
        path, why, many(new.kept, "intact record"), many(new.lost, "lost record"),
        "a tidings.lost marker" if new.lost == 1 else "tidings.lost markers", start, new.next - 1,
    )  # fmt: skip
    if new.next == start and end is not None:  # nothing of its range: the next segment goes on
        temp.unlink()
        path.unlink()
        result = None
    else:
        temp.rename(target)
        if target != path:
            path.unlink()
        result = target
    fsync_dir(directory)
    return result
