"""``tidings-broker --check``: what a start-up would find in a data directory, changing nothing.

An offline check in the manner of ``redis-check-aof`` or ``kafka-dump-log``:
before a start (after a crash, a disk error, a restore), an operator learns
which queues a start would serve, which it would refuse, and what
``--repair`` would do to those, without a start's side effects.

Theory of operation
-------------------
Each queue's log is read the way a start-up's recovery reads it
(:meth:`broker.log.QueueLog.open`): the same scan of every segment file, in
offset order, with the same recovery point, so the verdicts are the start's
own. The differences are what makes it a check:

* nothing is written: segment files are opened read-only, a torn tail is
  only reported (``Segment.scan(cut=False)``), and the unsynced tail is not
  fsynced, the recovery point not rewritten, no directory created;
* a damaged segment does not stop the walk: what ``--repair`` would do to it
  is computed by the repair's own planning (:func:`broker.repair.plan_salvage`,
  the code :func:`broker.repair.salvage` writes from), and the walk goes on
  from where the rewritten file would end, as the repair's start-up does. So
  the counts printed are those a repair then makes;
* the durable cursors are read as a start reads them
  (:meth:`broker.cursors.CursorStore.examine`), and compared with the end
  of the log the start would serve; their settings are read by the
  start's own reading (:func:`broker.durables.settings_of`);
* what a start would remove or pass over in a queue's directory is named
  with what it does to it (:func:`leftovers`), and left as it is.

Each segment is read once by the scan (as at a start: a sparse index,
``READ_CHUNK`` at a time); only a damaged one is read again, mapped, by the
planning.

The options
-----------
``--check`` takes the broker's own options and builds the configuration a
start would (``--config`` read by the broker's loader): options a start
would refuse are a usage error. Of them only ``--segment-bytes`` changes a
verdict (it bounds how many offsets ``--repair`` may mark lost: see
:func:`broker.repair.plan_salvage`), and it is the one most easily left
out, so a segment file that shows an append begun past the size given
(:func:`appended_after`) earns a note that names it
(:func:`segment_size_note`). The check still uses the size given: its
verdicts are those of a start with the same options.

The lock
--------
A broker holds ``LOCK`` (an exclusive ``flock``) while it runs, and cuts,
rewrites and appends to the files; a check of files changing under it would
report nonsense. The check takes the same lock *shared*, on a read-only
descriptor, and never writes it (a broker writes its pid there): a running
broker makes the check fail at once, several checks may run together, and
a broker started meanwhile refuses to start until the check ends. A
directory without ``LOCK`` has never had a broker; it is checked without
one (creating the file would change the directory).

Exit codes: :data:`EXIT_OK` (every queue would be served: torn tails are
fine, a start cuts them), :data:`EXIT_DAMAGED` (a start would refuse some
queue), :data:`EXIT_CANNOT_CHECK` (the lock is held, the directory or a
queue's files cannot be read). A damaged cursor does not change the code:
a start serves its queue, from an older copy of the cursor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from protocol.wording import many

from .cursors import DURABLES_DIR, CursorFiles, CursorStore, cursor_file
from .durables import SETTINGS, DurableSettings, settings_of
from .log import POINT_FILE, CorruptLogError, decode_point, read_point
from .recovery import base_of, every_file_lost, gap_before, is_segment_name, scan_read_only, segment_files
from .repair import TEMP_SUFFIX, BeyondRepair, plan_salvage
from .router import dead_letter_queue
from .segment import SUFFIX, Segment, TornTail
from .store import LOCK_FILE, DataDirInUse, lock_holder

__all__ = [
    "EXIT_CANNOT_CHECK", "EXIT_DAMAGED", "EXIT_OK", "DurableCheck", "QueueCheck", "appended_after", "check_queue",
    "leftovers", "locked_for_check", "segment_size_note",
]  # fmt: skip

EXIT_OK: Final = 0
EXIT_DAMAGED: Final = 1
#: 2 is argparse's usage error; 3 is what the daemon exits with on a storage failure, alike in spirit.
EXIT_CANNOT_CHECK: Final = 3


@dataclass(slots=True)
class DurableCheck:
    """One durable's cursor: the copy a start would take, and whether it points past the log's end."""

    name: str
    files: CursorFiles
    #: The end of the log the start would serve (the cursor is moved back to it if past it).
    log_end: int
    #: The queue's name (its default dead-letter queue is named after it).
    queue: str = ""
    #: The first offset of the log the start would serve.
    log_first: int = 0

    def lines(self) -> list[str]:
        """Its state (:meth:`describe`), then, indented, the settings a start restores for it (:meth:`settings`)."""
        return [self.describe(), f"  {self.settings()}"]

    def settings(self) -> str:
        """One line: the settings a start restores (see :mod:`broker.durables`), and what it lost of them."""
        used = self.files.used
        settings = settings_of(self.files.state.meta)
        if used is None or len(settings.defaulted) == len(SETTINGS):
            return (
                f"settings: {'lost with its cursor file' if used is None else 'none in its cursor file'}; a start "
                f"restores the defaults ({_settings_text(DurableSettings(), self.queue)}) until a consumer "
                "subscribes again with its own (a FETCH without events keeps every event)"
            )
        text = _settings_text(settings, self.queue)
        again = self._redelivered(settings)
        if again:
            text += f"; {many(again, 'message')} handed out and not acked: a start hands them out again, redelivered"
        if settings.defaulted:
            text += (
                f"; {', '.join(SETTINGS[key] for key in settings.defaulted)} not in its file (missing or not valid): "
                "a start uses the default until a consumer subscribes with its own"
            )
        if settings.ignored:
            text += f"; ignored by a start: {', '.join(settings.ignored)}"
        if used != ".cursor":
            return f"settings (as {self.name}{used} has them: a change after it is lost): {text}"
        return f"settings: {text}"

    def _redelivered(self, settings: DurableSettings) -> int:
        """How many messages a start marks as handed out before and not acked (as ``group_from_state`` does)."""
        state = self.files.state
        floor = min(state.ack_floor, self.log_end)  # (a start moves a cursor past the end back to it)
        start = max(floor, self.log_first)
        upto = min(floor if settings.delivered is None else settings.delivered, self.log_end)
        if upto <= start:
            return 0
        return upto - start - sum(start <= offset < upto for offset in state.acked)

    def describe(self) -> str:
        """One line: ok, damaged (and what a start does instead), or past the log's end."""
        state = self.files.state
        acked = f"acked below {state.ack_floor}" + (f" (and {len(state.acked)} above)" if state.acked else "")
        used = self.files.used
        if used is None:
            what = "; ".join(f"{self.name}{suffix} is damaged" for suffix in self.files.damaged) or "none found"
            return f"durable {self.name}: damaged: no whole cursor file ({what}); a start restarts it at the oldest message"
        if used != ".cursor":
            missing = "damaged" if ".cursor" in self.files.damaged else "missing"
            return (
                f"durable {self.name}: damaged: {self.name}.cursor is {missing}; a start uses {self.name}{used} "
                f"({acked}): what was acked after it is delivered again"
            )
        if state.ack_floor > self.log_end:
            return (
                f"durable {self.name}: past the log's end: {acked}, but the log ends at {self.log_end} (records were "
                f"lost); a start moves it back to {self.log_end}"
            )
        return f"durable {self.name}: ok, {acked}"


@dataclass(slots=True)
class QueueCheck:
    """What a start would find in one queue's log (and, with damage, what ``--repair`` would make of it)."""

    name: str
    #: The offsets a start would serve: ``[first, end)`` (after the repair, if damaged).
    first: int = 0
    end: int = 0
    files: int = 0
    torn: TornTail | None = None
    #: Each segment a start refuses (and ``--repair`` rewrites): "FILE byte B: reason".
    damage: list[str] = field(default_factory=list)
    #: Offsets ``--repair`` would mark lost (a ``tidings.lost`` marker each).
    lost: int = 0
    #: Why ``--repair`` would refuse it too, or None.
    beyond: str | None = None
    #: Why its files could not be read, or None.
    unreadable: str | None = None
    durables: list[DurableCheck] = field(default_factory=list)
    #: The latest byte of one of its segment files after which an append began,
    #: and the file (see :func:`segment_size_note`), or None.
    appended_past: tuple[int, str] | None = None
    #: What a start removes or ignores in its directory: "NAME: what it is; what a start does with it".
    leftovers: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        """Would a start refuse it?"""
        return bool(self.damage)

    def lines(self) -> list[str]:
        """The queue's line, one indented line per durable, then one per file a start removes or ignores."""
        lines = [f"{self.name}: {self._state()}"] + [f"  {line}" for d in self.durables for line in d.lines()]
        return lines + [f"  ({leftover})" for leftover in self.leftovers]

    def _state(self) -> str:
        if self.unreadable is not None:
            return f"cannot check: {self.unreadable}"
        if self.damaged:
            head = f"DAMAGED, a start refuses it (QUEUE_CORRUPT): {'; and '.join(self.damage)}"
            if self.beyond is not None:
                return f"{head}; --repair cannot repair it either: {self.beyond}"
            if self.files == 0:
                return f"{head}; --repair would start its log at offset {self.end}: the records below it are lost, unmarked"
            kept = self.end - self.first - self.lost
            return (
                f"{head}; --repair would keep {many(kept, 'intact record')} and mark {many(self.lost, 'offset')} "
                f"lost (a tidings.lost message each): then {self._records()}"
            )
        if self.torn is not None:
            torn = self.torn
            return (
                f"torn tail: {many(torn.length, 'byte')} from byte {torn.position} of {torn.path.name} would be cut at "
                f"start-up (no fsync known to cover it: {torn.why}; {many(torn.intact, 'intact record')} after it), leaving "
                f"{self._records()}"
            )
        return f"ok, {self._records()}"

    def _records(self) -> str:
        if self.end == self.first:
            return f"no records (next offset {self.end})"
        return f"{many(self.end - self.first, 'record')}, offsets {self.first} to {self.end - 1}"


def _settings_text(settings: DurableSettings, queue: str) -> str:
    """``events A, B; ack wait 30 s; at most 5 deliveries, then to Q``."""
    events = ", ".join(settings.events) if settings.events else "*"
    limit = (
        f"at most {many(settings.max_deliveries, 'delivery', 'deliveries')}, then to "
        f"{dead_letter_queue(queue, settings.dead_letter)}"
        if settings.max_deliveries
        else "no delivery limit" + (f" (dead letters to {settings.dead_letter})" if settings.dead_letter else "")
    )
    return f"events {events}; ack wait {settings.ack_wait:g} s; {limit}"


@contextlib.contextmanager
def locked_for_check(root: Path) -> Iterator[None]:
    """Hold ``root``'s ``LOCK`` shared while checking (see "The lock" above).

    Raises:
        DataDirInUse: a broker holds it.
        OSError: the directory or ``LOCK`` cannot be read.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"no data directory {root}")
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # no broker ever used it (and none can hold it)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirInUse(f"data directory {root} is in use by a broker{lock_holder(fd)}: stop it first") from None
        yield
    finally:
        os.close(fd)  # (releases the flock)


def check_queue(directory: Path, *, segment_bytes: int) -> QueueCheck:
    """Check one queue's log and cursors, reading only.

    Args:
        directory: the queue's directory.
        segment_bytes: the ``--segment-bytes`` of the start it answers for (bounds what ``--repair`` would mark lost).
    """
    result = QueueCheck(directory.name)
    try:
        _check_log(directory, segment_bytes, result)
        if result.beyond is None:
            cursors = CursorStore(directory / DURABLES_DIR)
            for name in sorted(cursors.names()):
                result.durables.append(
                    DurableCheck(name, cursors.examine(name), result.end, directory.name, result.first)
                )
        result.leftovers = leftovers(directory, result.durables if result.beyond is None else None)
    except OSError as exc:
        result.unreadable = str(exc)
    return result


def leftovers(directory: Path, durables: list[DurableCheck] | None) -> list[str]:
    """What a start removes or passes over in a queue's directory, named with what it does (it reads only).

    A start reads the segment files, the recovery point and the cursor
    files in ``durables/``; a repair's temporary file is removed by a start
    with ``--repair`` (:func:`broker.repair.drop_stale`) and left by one
    without; a damaged recovery point is ignored; anything else is never
    opened. A ``.cursor.tmp`` beside a whole ``.cursor`` is a save a crash
    cut short: loads never reach it. (One a load does take, or finds
    damaged on its way, is in the durable's own line.)

    Args:
        directory: the queue's directory.
        durables: its durables as checked; None if they were not (``durables/`` is then not looked at).

    Returns:
        One entry per file, in name order: "NAME: what it is; what a start does with it".

    Raises:
        OSError: a directory or the recovery point cannot be read.
    """
    found: list[str] = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if is_segment_name(name) or (name == DURABLES_DIR and path.is_dir()):
            continue
        if name == POINT_FILE:
            if decode_point(path.read_bytes()) is None:
                found.append(f"{name}: damaged; a start ignores it and trusts only the records' own sync claims")
        elif name.endswith(SUFFIX + TEMP_SUFFIX):
            found.append(
                f"{name}: left by a --repair that a crash interrupted (the file it was rewriting is still in "
                "place); a start with --repair removes it and repairs again, one without leaves it"
            )
        else:
            found.append(f"{name}: not a file of the log; a start ignores it")
    cursors = directory / DURABLES_DIR
    if durables is None or not cursors.is_dir():
        return found
    whole = {durable.name for durable in durables if durable.files.used == ".cursor"}
    for path in sorted(cursors.iterdir()):
        split = cursor_file(path.name)
        if split is None:
            found.append(f"{DURABLES_DIR}/{path.name}: not a cursor file; a start ignores it")
        elif split[1] == ".cursor.tmp" and split[0] in whole:
            found.append(
                f"{DURABLES_DIR}/{path.name}: left by a cursor save that a crash interrupted; a start ignores it "
                f"({split[0]}.cursor is whole), and the durable's next save replaces it"
            )
    return found


def _check_log(directory: Path, segment_bytes: int, result: QueueCheck) -> None:
    """Walk the segments as ``QueueLog.open`` does, with ``--repair``'s plan at each damage (see above).

    Raises:
        OSError: a file cannot be read.
    """
    names = segment_files(directory)
    point = read_point(directory)
    result.files = len(names)
    if not names and point > 0:  # as QueueLog.open: lost records, and --repair starts the log at the point
        result.damage.append(every_file_lost(point))
        result.first = result.end = point
        return
    served = False  # has a segment been kept yet (scanned, or rewritten by the repair)?
    end = floor_ts = 0
    for i, path in enumerate(names):
        after = None if i == len(names) - 1 else base_of(names[i + 1])
        start = end if served else base_of(path)
        gap = gap_before(path, start)
        if gap is not None:
            result.damage.append(gap)
        else:
            try:
                segment, torn = scan_read_only(path, start, after, point)
            except CorruptLogError as exc:
                result.damage.append(f"{path.name} byte {exc.position}: {exc.reason}")
            else:
                result.torn = result.torn or torn
                past = appended_after(segment)
                if past >= 0 and (result.appended_past is None or past > result.appended_past[0]):
                    result.appended_past = (past, path.name)
                if not served:
                    result.first = segment.base
                served, end, floor_ts = True, segment.next_offset, segment.last_ts
                continue
        try:
            plan = plan_salvage(path, start, after, point, floor_ts, segment_bytes)
        except BeyondRepair as exc:
            result.beyond = f"{path.name}: {exc} (a file name is wrong)"
            return
        result.lost += plan.lost
        if plan.next == start and after is not None:
            continue  # the repair removes the file: nothing of its range is left
        if not served:
            result.first = start
        served, end, floor_ts = True, plan.next, plan.last_ts
    result.end = end


def appended_after(segment: Segment) -> int:
    """The latest byte of ``segment``'s file after which an append began, as its index tells (-1: it cannot).

    An append writes its records with one timestamp, and timestamps never
    go down in a log; so an indexed record older than the file's last one
    was written by an earlier append than the last, which began after it.
    A broker rolls a segment before an append once its records reach
    ``--segment-bytes``, so the broker that made that append ran with more
    than this many bytes. One append of many records that takes a file past
    the size is no sign: its records share a timestamp. The answer is for a
    note, not a verdict: appends in one millisecond are not told apart (a
    size it misses), and a file ``--repair`` rewrote, its lost markers in
    place of smaller records, may show one that no broker made.
    """
    last = segment.last_ts
    for position, ts in zip(reversed(segment.positions), reversed(segment.timestamps), strict=True):
        if ts < last:
            return position
    return -1


def segment_size_note(checks: list[QueueCheck], segment_bytes: int) -> str | None:
    """A note when a segment file shows that its broker ran with a larger ``--segment-bytes`` than the check's.

    The check's verdicts are those of a start with the options it was given;
    the segment size is the one that changes them (it bounds how many
    offsets ``--repair`` may mark lost), and the one most easily left out.
    """
    found = [(check.appended_past, check.name) for check in checks if check.appended_past is not None]
    if not found:
        return None
    (past, file), queue = max(found)
    if past < segment_bytes:
        return None
    return (
        f"note: {queue}/{file} was appended to after byte {past}: the broker that wrote it ran with a "
        f"--segment-bytes above {past}, not {segment_bytes} as given here; give --check the broker's own options "
        f"(the segment size bounds how many offsets --repair may mark lost, so a verdict above may differ from "
        f"its start's)"
    )
