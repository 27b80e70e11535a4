"""Opening a queue's log again: its segment files in order, and what happens at a gap or damage.

:meth:`broker.log.QueueLog.open` walks the segment files of a queue in
offset order; each must go on from where the one before ended. A file is
scanned by :meth:`broker.segment.Segment.scan` (which cuts a torn tail and
raises at damage, see :mod:`broker.segment`); a file that does not go on
from the one before, or is damaged, refuses the queue, unless the broker
runs with ``--repair``, which salvages it first (:mod:`broker.repair`).
``tidings-broker --check`` (:mod:`broker.check`) makes the same walk
without changing a file (:func:`scan_read_only`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .repair import salvage
from .segment import SUFFIX, CorruptLogError, LogFailedError, Segment, TornTail

__all__ = [
    "base_of", "durably", "every_file_lost", "gap_before", "is_segment_name", "open_fd", "recover_segment",
    "scan_read_only", "segment_files",
]  # fmt: skip


@contextlib.contextmanager
def durably(what: str) -> Iterator[None]:
    """Recovery's writes and syncs: an OSError in them is a LogFailedError.

    What such a failure leaves on disk is unknown (a failed fsync may drop
    the dirty pages while the page cache still shows them), so the log is
    refused until a restart rather than loaded again, unlike a failed read.
    """
    try:
        yield
    except LogFailedError:
        raise
    except OSError as exc:
        raise LogFailedError(f"{what}: {exc}") from exc


def open_fd(path: Path) -> int:
    """A read/write descriptor of the segment file at ``path``, created if missing."""
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)


def base_of(path: Path) -> int:
    """The first offset of the segment file at ``path`` (its name)."""
    return int(path.name[: -len(SUFFIX)])


def segment_files(directory: Path) -> list[Path]:
    """The segment files of the log in ``directory``, in offset order."""
    return sorted(p for p in directory.iterdir() if is_segment_name(p.name))


def is_segment_name(name: str) -> bool:
    """Is ``name`` a segment file's (digits, then ``.log``)? Any other file a start leaves alone."""
    return name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit()


def every_file_lost(point: int) -> str:
    """Why a log with a recovery point ``point`` but no segment file is damage."""
    return f"no segment file is left, but records below {point} had been stored (the recovery point says)"


def gap_before(path: Path, start: int) -> str | None:
    """Why the segment at ``path`` cannot go on from offset ``start`` (a file
    before it is missing), or None if it starts there."""
    base = base_of(path)
    if base == start:
        return None
    if base > start:
        return f"no segment file holds offsets {start} to {base - 1} ({path.name} starts after them)"
    return f"{path.name} starts at offset {base}, inside the segment before it (which holds offsets below {start})"


def recover_segment(
    path: Path, start: int, end: int | None, *, point: int, repair: bool, floor_ts: int, segment_bytes: int
) -> Segment | None:
    """Open and scan one segment file that must hold the log from offset ``start`` on.

    With ``repair``, a segment that does not start at ``start``, that is
    damaged, or that is the last and ends before the recovery point is
    salvaged first (:func:`broker.repair.salvage`); None if nothing of it is left.

    Args:
        end: the next segment's first offset; None for the last segment.
        floor_ts: the timestamp of the log's record before ``start`` (0: none).
        segment_bytes: the configured segment size (bounds a repair's markers).

    Raises:
        CorruptLogError: it is damaged (as above) and not ``repair``, or
            beyond repair (see ``salvage``).
        LogFailedError: a cut or a repair could not be made durable.
    """
    why = gap_before(path, start)
    if why is not None:
        if not repair:
            raise CorruptLogError(path.parent, None, why)
    else:
        try:
            return _scanned(path, start, end, point)[0]
        except CorruptLogError as exc:
            if not repair:
                raise
            why = f"byte {exc.position}: {exc.reason}"
    with durably(f"{path}: repair"):
        salvaged = salvage(path, start, end, point, why, floor_ts, segment_bytes)
    # Rewritten and fsynced whole: nothing in it is torn, and a recovery point it
    # does not reach was not believed (see salvage); open() lowers it.
    return None if salvaged is None else _scanned(salvaged, start, end, 0)[0]


def scan_read_only(path: Path, base: int, end: int | None, point: int) -> tuple[Segment, TornTail | None]:
    """What :func:`recover_segment` finds in a segment, without changing it (``tidings-broker --check``).

    Returns:
        The segment, scanned (its descriptor closed), and the torn tail a
        start-up would cut, if any.

    Raises:
        CorruptLogError: it is damaged (the start-up would refuse it or, with
            ``--repair``, salvage it).
        OSError: it cannot be read.
    """
    segment, torn = _scanned(path, base, end, point, cut=False)
    os.close(segment.fd)
    return segment, torn


def _scanned(
    path: Path, base: int, end: int | None, point: int, *, cut: bool = True
) -> tuple[Segment, TornTail | None]:
    """The segment at ``path``, scanned (see ``Segment.scan``); the last one must reach the recovery point.

    Without ``cut`` the file is opened read-only and a torn tail is only reported.
    """
    fd = open_fd(path) if cut else os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    segment = Segment(path, fd, base)
    try:
        torn = segment.scan(last=end is None, point=point, cut=cut)
        if end is None and point > segment.next_offset:
            # Synced records are missing at the end (a truncated or lost file).
            why = f"the log ends at record {segment.next_offset}, but records below {point} had been fsynced"
            raise CorruptLogError(path, segment.size, why)
    except BaseException:
        os.close(segment.fd)
        raise
    return segment, torn
