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

Deciding and writing are apart: a :class:`SalvagePlan` walks the old
file once and yields the new file's contents as steps (:class:`Keep` a
record, :class:`Mark` a run of offsets lost), or finds it beyond repair
(:class:`BeyondRepair`: more markers than a segment could have held);
:func:`salvage` writes those steps, and ``tidings-broker --check`` counts
them without writing (:func:`plan_salvage`), so what the check announces is
what a repair does.

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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from protocol import LOST_EVENT, encode_record
from protocol.wording import many

from .segment import HEADER_SIZE, MAGIC, SUFFIX, CorruptLogError, check_any, encode_records, fsync_dir

__all__ = [
    "TEMP_SUFFIX", "BeyondRepair", "Keep", "Mark", "SalvagePlan", "drop_stale", "lost_marker", "plan_salvage", "salvage",
]  # fmt: skip

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
    the bytes it passes over (a record takes at least ``HEADER_SIZE``),
    counted from the last record taken or from the offset the file is named
    after, whichever is later (offsets below that were in the files before
    it, lost or not): a record that checks but has a wild offset (garbage
    that happens to pass, or a hostile file) is not believed, so it cannot
    ask for millions of markers. (Counted from the last record taken alone,
    a file after a lost one, its first record damaged, had every intact
    record after the damage disbelieved and marked lost.)
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
            if (offset - max(want, base)) * HEADER_SIZE <= pos - since:
                yield offset, timestamp, pos, HEADER_SIZE + length
                want = offset + 1
                pos = since = pos + HEADER_SIZE + length
                continue
        pos = buf.find(_NEEDLE, pos + 1)
        if pos == -1:
            return


@dataclass(frozen=True, slots=True)
class Keep:
    """A step of a salvage plan: copy the intact record at ``position`` (``length`` bytes, header included)."""

    offset: int
    timestamp: int
    position: int
    length: int


@dataclass(frozen=True, slots=True)
class Mark:
    """A step of a salvage plan: a lost marker for each of ``count`` offsets from ``first``, stamped ``timestamp``."""

    first: int
    count: int
    timestamp: int


class BeyondRepair(Exception):
    """More offsets would be marked lost than a segment could have held records: a file name is wrong."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} records would be marked lost, more than a segment could have held")
        self.count = count


class SalvagePlan:
    """What a salvage of one segment file does, decided before (or without) writing anything.

    :meth:`steps` walks the old file's bytes once and yields what the new
    file holds, front to back; the counters are complete once it is done.
    :func:`salvage` writes the steps; ``tidings-broker --check`` only counts
    them (:func:`plan_salvage`), so both say the same.

    Args:
        start: the first offset the new file holds.
        end: the next segment's first offset; None for the last segment.
        fill_to: for the last segment, markers go at least up to here (the recovery point).
        floor_ts: the timestamp of the log's record before ``start`` (0: none).
        base: the offset the old file is named after.
        limit: the most markers one run may need (see ``salvage``'s ``segment_bytes``).
    """

    def __init__(self, start: int, end: int | None, fill_to: int, floor_ts: int, base: int, limit: int) -> None:
        self.start = start
        self.end = end
        self.fill_to = fill_to
        self.base = base
        self.limit = limit
        self.next = start  # the offset after the last one planned
        #: The timestamp of the last record planned, marker or not; before any,
        #: the log's record before ``start`` (0: none). Markers take it, so
        #: timestamps stay in order.
        self.last_ts = floor_ts
        self.kept = self.lost = 0
        #: Markers up to the recovery point not planned: more than a segment could hold (the point is wrong).
        self.point_ignored = 0

    def steps(self, buf: bytes | mmap.mmap) -> Iterator[Keep | Mark]:
        """The new file's contents, in order: every intact record of ``buf`` and markers for the gaps.

        Raises:
            BeyondRepair: a run of markers before a kept record, or up to the
                next segment, longer than a segment could have held.
        """
        for offset, timestamp, pos, length in _intact(buf, self.start, self.end, self.base):
            mark = self._mark_to(offset, timestamp)
            if mark is not None:
                yield mark
            yield Keep(offset, timestamp, pos, length)
            self.kept += 1
            self.next, self.last_ts = offset + 1, timestamp
        try:
            mark = self._mark_to(self.fill_to if self.end is None else self.end, 0)
        except BeyondRepair as exc:
            if self.end is not None:
                raise
            self.point_ignored = exc.count
            return
        if mark is not None:
            yield mark

    def _mark_to(self, offset: int, later_ts: int) -> Mark | None:
        """Markers for each offset from ``next`` to ``offset``, or None if there is none to mark."""
        count = offset - self.next
        if count <= 0:
            return None
        if count > self.limit:
            raise BeyondRepair(count)
        ts = self.last_ts or later_ts or int(time.time() * 1000)
        mark = Mark(self.next, count, ts)
        self.lost += count
        self.next, self.last_ts = offset, ts
        return mark


def plan_salvage(
    path: Path, start: int, end: int | None, fill_to: int, floor_ts: int, segment_bytes: int
) -> SalvagePlan:
    """What :func:`salvage` would do to ``path`` (same arguments), reading it and writing nothing.

    Returns:
        The plan, its steps done: ``kept``, ``lost``, ``next``, ``last_ts``, ``point_ignored``.

    Raises:
        BeyondRepair: ``salvage`` would refuse it.
        OSError: the file cannot be read.
    """
    with path.open("rb") as f, _mapped(f) as buf:
        plan = _plan(path, start, end, fill_to, floor_ts, segment_bytes, len(buf))
        for _ in plan.steps(buf):
            pass
    return plan


def _plan(
    path: Path, start: int, end: int | None, fill_to: int, floor_ts: int, segment_bytes: int, size: int
) -> SalvagePlan:
    limit = 2 * max(segment_bytes, size) // HEADER_SIZE
    return SalvagePlan(start, end, fill_to, floor_ts, int(path.name[: -len(SUFFIX)]), limit)


@contextlib.contextmanager
def _mapped(f: BinaryIO) -> Iterator[bytes | mmap.mmap]:
    """The bytes of open file ``f``, mapped (an empty file cannot be)."""
    size = os.fstat(f.fileno()).st_size
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"") as buf:
        yield buf


#: Markers encoded per write: a lost segment of small records needs up to millions of them.
_MARKERS_PER_WRITE: Final = 4096


def _write_markers(out: BinaryIO, step: Mark, marker: bytes) -> None:
    """Write ``step``'s markers (each record body ``marker``), a bounded number at a time."""
    for first in range(step.first, step.first + step.count, _MARKERS_PER_WRITE):
        count = min(_MARKERS_PER_WRITE, step.first + step.count - first)
        out.write(encode_records([marker] * count, first, step.timestamp, first))


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
    try:
        with path.open("rb") as f, _mapped(f) as buf, temp.open("wb") as out:
            new = _plan(path, start, end, fill_to, floor_ts, segment_bytes, len(buf))
            for step in new.steps(buf):
                if isinstance(step, Keep):
                    out.write(buf[step.position : step.position + step.length])  # its bytes as they are
                else:
                    _write_markers(out, step, lost_marker(note, step.timestamp))
            out.flush()
            os.fsync(out.fileno())
    except BeyondRepair as exc:
        temp.unlink()
        raise CorruptLogError(path, None, f"cannot repair ({why}): {exc}; a file name is wrong") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if new.point_ignored:
        logger.warning("%s: repair: not marking %d records up to the recovery point %d: more than a "
                       "segment could hold; the recovery point is wrong", path, new.point_ignored, fill_to)  # fmt: skip
    logger.warning(
        "%s: repair (%s): kept %s; %s now %s; it holds %s%s",
        path, why, many(new.kept, "intact record"), many(new.lost, "lost record"),
        "a tidings.lost marker" if new.lost == 1 else "tidings.lost markers",
        f"offsets {start} to {new.next - 1}" if new.next > start else "no record",
        f", as {target.name}" if target != path and new.next > start else "",
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
