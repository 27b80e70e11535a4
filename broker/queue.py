"""One queue at run time: its log, its groups, delivery and long-poll fetches.

Theory of operation
-------------------
``append()`` writes records to the log (the OS page cache) and returns their
offsets; the records become *committed* when the store's committer has synced
them (``--fsync always``) or at once (``interval`` / ``never``). Only committed
records are delivered or fetched, so a subscriber never sees a message that a
crash could take back, and publish confirms and deliveries follow one order.

``commit(upto)`` sends the PUBACKs of every publish below ``upto`` and then
pumps every group: each push consumer with credit gets its redeliveries first,
then new records from the group's read position, written to its socket as one
``write()`` per consumer per pump. Recently appended bodies stay in a small
in-memory tail, so live fan-out never touches the disk; catch-up reads go to
the log with ``pread``. Stored bytes are spliced into DELIVER and BATCH frames
as they are (no decode, no re-encode).

A record that fails its check when read back at run time (the disk changed it
after start-up, which checked every record) is never delivered and never
skipped silently: ``read()`` returns the good records before it and stops
there, the queue notes the damage (``damage``, in STATUS; logged once), push
consumers of a durable stop at it, and a FETCH that reaches it is answered
with ``QUEUE_CORRUPT``. Publishing goes on. An operator moves each durable
past it (``tidings seek``); a restart refuses the queue like any damage
until ``--repair`` puts a lost marker in its place (:mod:`broker.repair`).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgpack

from protocol import (
    PRODUCER_HEADER,
    ErrorCode,
    EventFilter,
    LocalProtocolError,
    encode_batch,
    encode_deliver,
    encode_error,
    record_event,
)
from protocol.framing import pack_body
from protocol.wire import BATCH_OVERHEAD, BATCH_RECORD_OVERHEAD, record_headers_at

from .log import CorruptLogError, QueueLog
from .router import Consumer, Group
from .segment import for_clients

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger(__name__)

__all__ = ["Confirmer", "FetchWaiter", "PushTarget", "Queue", "QueueUnavailable"]

#: Records kept in memory after append, so that live subscribers are fed
#: without a disk read. 8 MiB / 8192 records bound it (whichever comes first);
#: once past either, the oldest are dropped down to 3/4 of both at once (one
#: ``del`` of a list's head, rarely, instead of a pop per record).
TAIL_MAX_RECORDS: Final = 8192
TAIL_MAX_BYTES: Final = 8 * 1024 * 1024
#: Records read from the log per pread batch when catching up.
READ_BATCH: Final = 512
#: The header that carries a publish's message_id in the stored record.
MESSAGE_ID_HEADER: Final = "x-message-id"
_MESSAGE_ID_BYTES: Final = MESSAGE_ID_HEADER.encode()
_PRODUCER_BYTES: Final = PRODUCER_HEADER.encode()
#: Set on the first message a durable gets after retention dropped some it had not read.
GAP_HEADER: Final = "x-retention-gap"
#: Most bytes of records written to one subscriber per write (see pump()).
PUMP_MAX_BYTES: Final = 256 * 1024
#: Most bytes of record bodies one read from the log returns (but one record
#: at least): bounds the memory of a catch-up read; a reader that wants more
#: (a FETCH filling its BATCH) reads again.
READ_MAX_BYTES: Final = 768 * 1024


class PushTarget(Protocol):
    """What a queue needs from a push subscription (implemented by the session)."""

    sub_id: int

    def write(self, data: bytes) -> None:
        """Write bytes to the subscriber's socket now."""


class Confirmer(Protocol):
    """Receives PUBACKs: implemented by the session."""

    def confirm(self, acks: list[tuple[int, int, bool]]) -> None:
        """Send PUBACK ``(req, offset, duplicate)`` for each entry."""

    def fail(self, acks: list[tuple[int, int, bool]], code: ErrorCode, message: str) -> None:
        """Answer each entry's request with ERR instead (storage failed)."""


class FetchWaiter:
    """A FETCH waiting for records (long poll).

    Attributes:
        reply: called once with the BATCH frame bytes.
        max_frame: the largest frame body the fetcher takes (the frame limit
            its connection announced in WELCOME): no BATCH is bigger.
        consumer: the session's pull consumer (durable fetch) or None (plain read).
        position: next offset to read (plain read only).
    """

    __slots__ = ("consumer", "filter", "group", "max_frame", "max_messages", "position", "reply", "req", "timer")

    def __init__(
        self,
        req: int,
        reply: Callable[[bytes], None],
        max_messages: int,
        *,
        max_frame: int,
        group: Group | None = None,
        consumer: Consumer | None = None,
        position: int = 0,
        filter: EventFilter | None = None,
    ) -> None:
        self.req = req
        self.reply = reply
        self.max_messages = max_messages
        self.max_frame = max_frame
        self.group = group
        self.consumer = consumer
        self.position = position
        self.filter = filter
        self.timer: asyncio.TimerHandle | None = None


class Queue:
    """A queue: log + committed mark + groups + pending confirms + waiters.

    Args:
        name: the queue's name.
        log: its open log.
    """

    def __init__(self, name: str, log: QueueLog) -> None:
        self.name = name
        self.log = log
        self.committed = log.next_offset
        self.groups: dict[str, Group] = {}  # durables by name
        self.ephemeral: set[Group] = set()
        self.waiters: list[FetchWaiter] = []
        self._confirms: deque[tuple[int, Confirmer, list[tuple[int, int, bool]]]] = deque()
        self._tail: list[bytes] = []  # the records from _tail_base on
        self._tail_base = log.next_offset
        self._tail_bytes = 0
        self._dedup: dict[str, tuple[int, float]] = {}
        #: The first record found damaged at run time, and why (None: none found).
        self.damage: tuple[int, str] | None = None
        #: Where the last read that failed with an I/O error started, and why (None once a
        #: read from there worked): its readers stop there and try again on their next turn.
        self.read_error: tuple[int, str] | None = None
        #: Per producer: the last sequence stored here and when to forget it.
        self.producers: dict[str, tuple[int, float]] = {}
        self._sequences: dict[str, tuple[list[tuple[int, int, int]], int, int]] = {}  # find_sequence's cache
        self.published = 0  # since start, for the publish rate in STATUS
        #: Called with a group whose ``dead`` list has offsets to move to its
        #: dead-letter queue (set by the store).
        self.on_dead: Callable[[Queue, Group], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Queue {self.name} [{self.log.first_offset}, {self.log.next_offset}) "
            f"committed={self.committed} groups={len(self.groups)}+{len(self.ephemeral)}>"
        )

    # --- publishing ---------------------------------------------------------

    def find_duplicate(self, message_id: str, now: float) -> int | None:
        """The offset stored for ``message_id`` within the dedup window, if any."""
        hit = self._dedup.get(message_id)
        return hit[0] if hit is not None and hit[1] > now else None

    def find_sequence(self, producer: str, seq: int, oldest_ms: int) -> int | None:
        """The offset where ``producer`` stored sequence number ``seq``, if any.

        The first record of each run of a producer's consecutive sequence
        numbers stored together carries "PRODUCER:FIRST-LAST" (see the
        session). Only a resent publish asks (its sequence is at most the
        producer's last one here), and resent publishes come in ascending
        order: the first one scans the log back from the end to its run (or
        to records older than ``oldest_ms``), remembering every run of that
        producer it passes and which sequences the scan covered; the others
        are answered from that, found or not, without reading the log again.
        """
        known = self._sequences.get(producer)
        if known is None or not known[1] <= seq <= known[2]:
            known = self._scan_sequences(producer, seq, oldest_ms)
            self._sequences[producer] = known
        for start, first, last in known[0]:
            if first <= seq <= last:
                return start + seq - first
        return None

    def _scan_sequences(self, producer: str, seq: int, oldest_ms: int) -> tuple[list[tuple[int, int, int]], int, int]:
        """Runs ``(offset, first, last)`` of ``producer`` from the end of the log
        back to ``seq``'s run, and the range of sequences the scan covered:
        ``low`` to ``high`` (the producer's last), found or not."""
        runs: list[tuple[int, int, int]] = []
        high = self.producers.get(producer, (seq, 0.0))[0]
        low = seq + 1
        prefix = producer + ":"
        needle = prefix.encode()
        log = self.log
        end = log.next_offset
        while end > log.first_offset and low > seq:
            start = max(log.first_offset, end - READ_BATCH)
            offset = start
            while offset < end:
                try:
                    records = log.read(offset, max_count=end - offset, max_bytes=READ_MAX_BYTES)
                except CorruptLogError as exc:  # cannot tell: the resend is stored again
                    logger.warning("%s: looking for %s's sequence %d: %s", self.name, producer, seq, exc)
                    return runs, -1, high
                if not records:
                    break
                for off, ts, body in records:
                    if ts < oldest_ms:
                        low = -1  # nothing older counts
                    if needle in body:
                        run = parse_sequences((_record_headers(body) or {}).get(PRODUCER_HEADER), prefix)
                        if run is not None:
                            runs.append((off, *run))
                            low = min(low, run[0])
                offset = records[-1][0] + 1
            end = start
        if end <= log.first_offset:
            low = -1  # read it all
        return runs, low, high

    def append(
        self,
        bodies: list[bytes],
        timestamp_ms: int,
        *,
        dedup_until: float,
        ids: dict[int, str] | None = None,
        producer: tuple[str, int] | None = None,
    ) -> int:
        """Write records to the log (not yet synced) and remember them in the tail.

        ``ids`` maps the index in ``bodies`` of each message with a message id
        to that id (for deduplication until ``dedup_until``). ``producer`` is
        ``(producer, last sequence among bodies)`` when a named producer
        published them.

        Returns:
            The offset of the first record.

        Raises:
            OSError: the write failed (ENOSPC...); nothing was appended.
        """
        first = self.log.append(bodies, timestamp_ms)
        tail = self._tail
        tail.extend(bodies)
        self._tail_bytes += sum(map(len, bodies))
        if len(tail) > TAIL_MAX_RECORDS or self._tail_bytes > TAIL_MAX_BYTES:
            self._trim_tail()
        if ids:
            for i, mid in ids.items():
                self._dedup[mid] = (first + i, dedup_until)
        if producer is not None:
            seen = self.producers.get(producer[0])
            self.producers[producer[0]] = (producer[1] if seen is None else max(seen[0], producer[1]), dedup_until)
        self.published += len(bodies)
        return first

    def _trim_tail(self) -> None:
        """Drop the tail's oldest records, down to 3/4 of both of its limits (one record at least stays)."""
        tail = self._tail
        drop = max(0, len(tail) - TAIL_MAX_RECORDS * 3 // 4)
        dropped = sum(map(len, tail[:drop]))
        over = self._tail_bytes - dropped - TAIL_MAX_BYTES * 3 // 4
        if over > 0:  # large records: walk on by their sizes
            sizes = list(accumulate(map(len, tail[drop:])))
            more = min(bisect_left(sizes, over) + 1, len(sizes) - 1)
            if more > 0:
                drop += more
                dropped += sizes[more - 1]
        del tail[:drop]
        self._tail_bytes -= dropped
        self._tail_base += drop

    def expect_confirm(self, end: int, confirmer: Confirmer, acks: list[tuple[int, int, bool]]) -> None:
        """Send ``acks`` through ``confirmer`` once every offset below ``end`` is committed."""
        if end <= self.committed:
            confirmer.confirm(acks)
        else:
            self._confirms.append((end, confirmer, acks))

    def rebuild_dedup(self, window: float) -> int:
        """After a restart: index the message ids and producer sequences of the last ``window`` seconds.

        Returns:
            How many ids and producers were found.
        """
        now_ms, mono = int(time.time() * 1000), time.monotonic()
        offset = self.log.offset_for_time(now_ms - int(window * 1000))
        found = 0
        while offset < self.log.next_offset:
            records = self.log.read(offset, max_count=1024, max_bytes=READ_MAX_BYTES)
            if not records:
                break
            offset = records[-1][0] + 1
            for off, ts, body in records:
                if _MESSAGE_ID_BYTES not in body and _PRODUCER_BYTES not in body:
                    continue  # most records: no decoding
                headers = _record_headers(body)
                if not headers:
                    continue
                until = mono + window - (now_ms - ts) / 1000.0
                mid = headers.get(MESSAGE_ID_HEADER)
                if isinstance(mid, str):
                    self._dedup[mid] = (off, until)
                    found += 1
                producer, _, _ = str(headers.get(PRODUCER_HEADER, "")).rpartition(":")
                run = parse_sequences(headers.get(PRODUCER_HEADER), producer + ":") if producer else None
                if run is not None:
                    self.producers[producer] = (run[1], until)
        return found + len(self.producers)

    def prune_dedup(self, now: float) -> None:
        """Forget message ids, and producers silent for longer than the dedup window."""
        stale = [k for k, (_, until) in self._dedup.items() if until <= now]
        for k in stale:
            del self._dedup[k]
        for producer in [p for p, (_, until) in self.producers.items() if until <= now]:
            del self.producers[producer]
        self._sequences.clear()  # a reconnected producer's resends are over by the next tick

    # --- committing ---------------------------------------------------------

    def commit(self, upto: int) -> None:
        """Mark offsets below ``upto`` durable: confirm, then deliver."""
        if upto <= self.committed:
            return
        self.committed = upto
        confirms = self._confirms
        while confirms and confirms[0][0] <= upto:
            _, confirmer, acks = confirms.popleft()
            confirmer.confirm(acks)
        self.pump_all()

    def fail_pending(self, fail: Callable[[Confirmer, list[tuple[int, int, bool]]], None]) -> None:
        """Hand every unconfirmed publish to ``fail`` (storage failure)."""
        while self._confirms:
            _, confirmer, acks = self._confirms.popleft()
            fail(confirmer, acks)

    # --- reading ------------------------------------------------------------

    def read(self, offset: int, max_count: int, max_bytes: int = READ_MAX_BYTES) -> list[tuple[int, bytes]]:
        """Committed records from ``offset`` (at least the first retained one).

        ``max_bytes`` is what the reader can use (from the log: bodies up to
        it, and one more; a read beyond it is read again by the next round).

        Returns:
            ``(offset, body)`` pairs, at most ``max_count``, all below ``committed``.
        """
        offset = max(offset, self.log.first_offset)
        end = min(self.committed, offset + max_count)
        if offset >= end:
            return []
        if offset >= self._tail_base:
            base = self._tail_base
            return list(zip(range(offset, end), self._tail[offset - base : end - base], strict=True))
        try:
            records = self.log.read(offset, max_count=end - offset, max_bytes=min(max_bytes, READ_MAX_BYTES))
        except CorruptLogError:
            records = self._read_to_damage(offset, end)
        except OSError as exc:
            self._read_failed(offset, exc)
            return []
        if self.read_error is not None and self.read_error[0] == offset:
            self.read_error = None
        return [(o, body) for o, _ts, body in records]

    def _read_failed(self, offset: int, exc: OSError) -> None:
        """A read from ``offset`` failed (EIO): unlike damage, this may pass, so
        nothing is marked; the reader stops there and tries again on its next
        turn (a FETCH is answered STORAGE_FAILED). Logged once per offset."""
        if self.read_error is None or self.read_error[0] != offset:
            logger.error("queue %s: cannot read from record %d (%s); its readers stop there and try again",
                         self.name, offset, exc)  # fmt: skip
        self.read_error = (offset, exc.strerror or str(exc))

    def _read_to_damage(self, offset: int, end: int) -> list[tuple[int, int, bytes]]:
        """Read one record at a time up to the damaged one; note the damage."""
        records: list[tuple[int, int, bytes]] = []
        for o in range(offset, end):
            try:
                records += self.log.read(o, max_count=1, max_bytes=READ_MAX_BYTES)
            except OSError as exc:
                self._read_failed(o, exc)
                break
            except CorruptLogError as exc:
                if self.damage is None or self.damage[0] != o:
                    self.damage = (o, for_clients(exc, self.log.directory.parent))
                    logger.error("queue %s: record %d is damaged (%s); readers stop before it. Move each durable "
                                 "past it (tidings seek %s --durable NAME --to %d); a restart refuses the queue "
                                 "(--repair would put a tidings.lost record in its place)",
                                 self.name, o, exc, self.name, o + 1)  # fmt: skip
                break
        return records

    def _stuck_error(self, req: int, offset: int) -> bytes | None:
        """The ERR frame for request ``req`` of a reader stuck at ``offset``, if
        the record there is damaged or could not be read."""
        if self.read_error is not None and self.read_error[0] == offset:
            why = f"cannot read queue {self.name!r} from record {offset} ({self.read_error[1]}); try again"
            return encode_error(req, ErrorCode.STORAGE_FAILED, why)
        if self.damage is None or self.damage[0] != offset:
            return None
        why = (
            f"record {offset} of queue {self.name!r} is damaged ({self.damage[1]}); "
            f"a durable seeks past it, a plain read starts at {offset + 1}"
        )
        return encode_error(req, ErrorCode.QUEUE_CORRUPT, why)

    def body(self, offset: int) -> bytes | None:
        """The body at ``offset``, or None if retention dropped it or it is damaged."""
        got = self.read(offset, 1)
        return got[0][1] if got and got[0][0] == offset else None

    # --- push delivery --------------------------------------------------------

    def pump_all(self) -> None:
        """Deliver to every group that can take something, then serve waiters."""
        now = time.monotonic()
        for group in self.groups.values():
            if group.consumers:
                self.pump(group, now)
        for group in self.ephemeral:
            self.pump(group, now)
        if self.waiters:
            self.serve_waiters()

    def pump(self, group: Group, now: float) -> None:
        """Give each push consumer of ``group`` as much as its credit allows.

        Frames leave in writes of at most ``PUMP_MAX_BYTES``; a write that takes
        the socket over its high-water mark pauses the session's consumers at
        once (``pause_writing``), so a subscriber that does not read holds at
        most the high-water mark plus one write, whatever its prefetch.
        """
        if group.cursor.ack_floor < self.log.first_offset:
            self._dropped(group)
        match_all = group.filter.match_all
        matches = group.filter
        while True:
            progressed = False
            for consumer in group.push_consumers():
                target: PushTarget = consumer.owner  # type: ignore[assignment]
                credit = consumer.credit
                frames: list[bytes] = []
                size = 0
                while len(frames) < credit and size < PUMP_MAX_BYTES:
                    got = group.take_redelivery(consumer, now)
                    if got is None:
                        break
                    body = self.body(got[0])
                    if body is not None:
                        frames.append(encode_deliver(target.sub_id, got[0], got[1], body))
                        size += len(body)
                    elif got[0] < self.log.first_offset:
                        group.ack((got[0],), None)  # dropped by retention: nothing to redeliver
                    else:
                        break  # damaged: stays in flight, never delivered
                start = group.read_pos
                while len(frames) < credit and size < PUMP_MAX_BYTES and group.read_pos < self.committed:
                    records = self.read(group.read_pos, min(READ_BATCH, credit - len(frames)), PUMP_MAX_BYTES - size)
                    if not records:
                        break
                    for offset, body in records:
                        if group.passed(offset):
                            continue
                        if match_all or matches(record_event(body)):
                            n = group.deliver_new(consumer, offset, now)
                            if group.gap is not None:
                                body = _mark_gap(body, group)
                            frames.append(encode_deliver(target.sub_id, offset, n, body))
                            size += len(body)
                            if size >= PUMP_MAX_BYTES:
                                break
                        else:
                            group.skip(offset)
                if frames:
                    target.write(b"".join(frames))
                if frames or group.read_pos != start:
                    progressed = True
            if not progressed:
                break
        if group.dead and self.on_dead is not None:
            self.on_dead(self, group)

    def _dropped(self, group: Group) -> None:
        gap = group.skip_dropped(self.log.first_offset)
        if gap is not None:
            logger.warning("queue %s: durable %s missed offsets %d-%d: no longer in the log (dropped by retention "
                           "before it read them, or lost with their files: see the start-up log)",
                           self.name, group.name, *gap)  # fmt: skip

    # --- pull (FETCH) -------------------------------------------------------

    def take_for_fetch(self, waiter: FetchWaiter, now: float) -> bytes | None:
        """Try to fill a FETCH now.

        The BATCH takes the next records, up to ``waiter.max_messages``, for
        as long as its frame stays within ``waiter.max_frame``: each record
        counts its body and ``BATCH_RECORD_OVERHEAD``, the frame its own
        ``BATCH_OVERHEAD`` (the most their encodings can take). The first
        record always goes in: one published under this frame limit fits
        alone (``BrokerConfig.max_message_bytes`` leaves room for its entry).
        The first one that does not fit is left where it is, first in the next
        BATCH: a redelivery stays ready, a new record unread (later
        redeliveries and records wait behind it, so the order holds).

        Returns:
            The BATCH frame, or None if nothing is available yet.
        """
        group, consumer = waiter.group, waiter.consumer
        out: list[tuple[int, int, bytes]] = []
        room = waiter.max_frame - BATCH_OVERHEAD  # for the records' entries
        limit = waiter.max_messages
        full = False
        if group is not None and consumer is not None:
            while len(out) < limit:
                offset = group.next_redelivery()
                if offset is None:
                    break
                body = self.body(offset)
                if body is not None and out and len(body) + BATCH_RECORD_OVERHEAD > room:
                    full = True
                    break
                got = group.take_redelivery(consumer, now)  # hands out ``offset``
                assert got is not None and got[0] == offset
                if body is not None:
                    out.append((offset, got[1], body))
                    room -= len(body) + BATCH_RECORD_OVERHEAD
                elif offset >= self.log.first_offset:
                    break  # damaged: stays in flight, never delivered
            if group.cursor.ack_floor < self.log.first_offset:
                self._dropped(group)
            while not full and len(out) < limit and group.read_pos < self.committed:
                records = self.read(group.read_pos, min(READ_BATCH, limit - len(out)), room)
                if not records:
                    break  # a damaged record
                for offset, body in records:
                    if group.passed(offset):
                        continue
                    if group.filter(record_event(body)):
                        if group.gap is not None:
                            body = _with_gap(body, group.gap)
                        if out and len(body) + BATCH_RECORD_OVERHEAD > room:
                            full = True  # read_pos stays at it
                            break
                        n = group.deliver_new(consumer, offset, now)
                        group.gap = None  # said once, by this record
                        out.append((offset, n, body))
                        room -= len(body) + BATCH_RECORD_OVERHEAD
                    else:
                        group.skip(offset)
            next_offset = group.read_pos
        else:
            assert waiter.filter is not None
            position = max(waiter.position, self.log.first_offset)
            while not full and len(out) < limit and position < self.committed:
                records = self.read(position, min(READ_BATCH, limit - len(out)), room)
                if not records:
                    break  # a damaged record
                for offset, body in records:
                    if waiter.filter(record_event(body)):
                        if out and len(body) + BATCH_RECORD_OVERHEAD > room:
                            full = True  # the next plain read starts at it
                            break
                        out.append((offset, 1, body))
                        room -= len(body) + BATCH_RECORD_OVERHEAD
                    position = offset + 1
            waiter.position = next_offset = position
        if group is not None and group.dead and self.on_dead is not None:
            self.on_dead(self, group)
        if not out:
            return self._stuck_error(waiter.req, next_offset)
        return encode_batch(waiter.req, next_offset, out)

    def serve_waiters(self) -> None:
        """Answer every waiting FETCH that can now be filled."""
        now = time.monotonic()
        still: list[FetchWaiter] = []
        for waiter in self.waiters:
            frame = self.take_for_fetch(waiter, now)
            if frame is None:
                still.append(waiter)
                continue
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.reply(frame)
        self.waiters = still

    def expire_waiter(self, waiter: FetchWaiter) -> None:
        """The waiter's time is up: answer with an empty BATCH."""
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            position = waiter.group.read_pos if waiter.group is not None else waiter.position
            waiter.reply(encode_batch(waiter.req, position, []))

    def drop_waiters(self, reply: Callable[[bytes], None] | None = None, *, answer: bool = False) -> None:
        """Forget the waiters of one session (``reply``), or all of them; with
        ``answer``, each first gets the empty BATCH it would get at its time."""
        keep = []
        for w in self.waiters:
            if reply is None or w.reply == reply:
                if w.timer is not None:
                    w.timer.cancel()
                if answer:
                    position = w.group.read_pos if w.group is not None else w.position
                    w.reply(encode_batch(w.req, position, []))
            else:
                keep.append(w)
        self.waiters = keep


def _record_headers(body: bytes) -> dict[str, str] | None:
    """The headers of a stored record body (event, timestamp, headers, payload)."""
    _, headers, _ = _headers_span(body)
    return headers if isinstance(headers, dict) else None


def with_header(body: bytes, name: str, value: str) -> bytes:
    """A stored record body with one more header; the event, timestamp and
    payload bytes are kept as they are (the payload is not decoded)."""
    start, headers, end = _headers_span(body)
    return body[:start] + pack_body({**(headers or {}), name: value}) + body[end:]


def _headers_span(body: bytes) -> tuple[int, Any, int]:
    """``(start, headers, end)``: the headers of a record body, and where their bytes are.

    No ``msgpack.Unpacker`` (making one clears ~40 KB: about a quarter of a
    lone publish's broker instructions when it ran per publish).
    """
    start = record_headers_at(body)
    if body[start] == 0xC0:  # nil: the usual record
        return start, None, start + 1
    try:
        headers = msgpack.unpackb(body[start:], raw=False)
    except msgpack.ExtraData as extra:  # the payload after them: as it should be
        return start, extra.unpacked, len(body) - len(extra.extra)
    raise LocalProtocolError(f"record body has no payload after its headers: {headers!r}")


def parse_sequences(value: object, prefix: str) -> tuple[int, int] | None:
    """``(first, last)`` from an ``x-producer-seq`` value "PRODUCER:FIRST[-LAST]" of ``prefix``'s producer."""
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    first, _, last = value[len(prefix) :].partition("-")
    if not first.isdigit() or not (last or first).isdigit() or int(last or first) < int(first):
        return None
    return int(first), int(last or first)


def _mark_gap(body: bytes, group: Group) -> bytes:
    """``body`` with the group's retention gap (:func:`_with_gap`), which is then said."""
    assert group.gap is not None
    body = _with_gap(body, group.gap)
    group.gap = None
    return body


def _with_gap(body: bytes, gap: tuple[int, int]) -> bytes:
    """Re-encode ``body`` with the ``x-retention-gap`` header "FROM-TO"."""
    return with_header(body, GAP_HEADER, f"{gap[0]}-{gap[1]}")


class QueueUnavailable(Exception):
    """A queue that failed its start-up checks (corrupt log, or its files could
    not be read), or is being deleted."""

    def __init__(self, queue: str, reason: str, *, code: ErrorCode = ErrorCode.QUEUE_CORRUPT) -> None:
        super().__init__(f"queue {queue!r} is unavailable: {reason}")
        self.queue = queue
        self.reason = reason
        self.code = code
