"""The routing core: who gets which offset next. Pure: no I/O, no asyncio.

Theory of operation
-------------------
Every subscription reads a queue through a :class:`Group`:

* a **durable** group is named ``(queue, durable)``, keeps a cursor that the
  broker persists, and may have several consumers (competing consumers: each
  message goes to one of them);
* an **ephemeral** group belongs to one push subscription, auto-acks on
  delivery (at-most-once) and is forgotten when the subscription ends.

A group's state, with its invariants:

* ``cursor`` (ack floor + acked set): every offset below ``cursor.ack_floor``
  is done. Only ACK (or a filter skip) advances it.
* ``read_pos``: the lowest offset never handed out. Offsets in
  ``[ack_floor, read_pos)`` are each exactly one of: acked, in flight
  (``in_flight[offset]``), waiting for redelivery (``ready`` heap or
  ``delayed``). Nothing is ever forgotten, so nothing is ever skipped.
* ``deliveries[offset]`` counts hand-outs of offsets not yet acked.
* A consumer never holds more than ``prefetch`` unacked offsets (credit).

Redeliveries go out before new offsets, lowest offset first, so a consumer
that comes back sees what it missed in log order. The shell
(``broker/queue.py``) reads records and calls :meth:`Group.next_redelivery`,
:meth:`Group.take_redelivery`, :meth:`Group.deliver_new` and
:meth:`Group.skip`; it never touches the fields.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Final

from protocol import ErrorCode, subscription_filter

from .cursors import Cursor

__all__ = ["AckError", "Consumer", "Group", "dead_letter_queue"]

#: A message not acked within this time is redelivered (NATS AckWait default).
DEFAULT_ACK_WAIT: Final = 30.0
#: The shortest ack wait: the protocol counts it in milliseconds
#: (``ack_wait_ms``, where 0 asks for the default), so 1 ms is the least a
#: consumer can ask for, and the least a cursor file may hold.
MIN_ACK_WAIT: Final = 0.001
#: The ack wait doubles per redelivery, up to 2**3 = 8 times the configured one.
MAX_BACKOFF_SHIFT: Final = 3


class AckError(Exception):
    """An ACK/NACK named an offset that is not in flight (pure-core signal;
    the session turns it into ERR BAD_ACK)."""

    code: Final = ErrorCode.BAD_ACK


class Consumer:
    """One attachment to a group: a push subscription or a session's pulls.

    Args:
        owner: opaque handle of the shell (the session's subscription object).
        prefetch: most unacked offsets this consumer may hold.
        push: whether the group pushes to it (False: fetch-only).
    """

    __slots__ = ("held", "owner", "paused", "prefetch", "push")

    def __init__(self, owner: object, prefetch: int, *, push: bool = True) -> None:
        self.owner = owner
        self.prefetch = prefetch
        self.push = push
        self.paused = False
        self.held: set[int] = set()

    @property
    def credit(self) -> int:
        """How many more offsets this consumer may take now."""
        return 0 if self.paused else self.prefetch - len(self.held)

    def __repr__(self) -> str:
        return f"<Consumer {self.owner!r} held={len(self.held)}/{self.prefetch}>"


class Group:
    """The delivery state of one durable (or one ephemeral subscription).

    Args:
        queue: the queue's name.
        name: the durable name, or None for an ephemeral group.
        events: the event filter patterns.
        cursor: the persisted cursor (a fresh one for a new group).
        read_pos: first offset to hand out (never below the ack floor).
        ack_wait: seconds before an unacked message is redelivered.
        max_deliveries: hand-outs before a message is dead-lettered (0 = no limit).
    """

    def __init__(
        self,
        queue: str,
        name: str | None,
        events: Iterable[str],
        cursor: Cursor,
        read_pos: int,
        *,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliveries: int = 0,
        dead_letter: str | None = None,
    ) -> None:
        self.queue = queue
        self.name = name
        self.filter = subscription_filter(events)
        self.cursor = cursor
        self.read_pos = max(read_pos, cursor.ack_floor)
        self.ack_wait = ack_wait
        self.max_deliveries = max_deliveries
        #: Where dead letters go (None: ``<queue>.dead``).
        self.dead_letter = dead_letter
        #: Offsets that used up max_deliveries, waiting for the shell to move
        #: them (``(offset, deliveries)``), and those whose copy in the
        #: dead-letter queue is not yet stored: they are acked once it is.
        self.dead: list[tuple[int, int]] = []
        self.parked: set[int] = set()
        #: Offsets retention dropped before this durable got them, until the
        #: next delivery says so in its ``x-retention-gap`` header.
        self.gap: tuple[int, int] | None = None
        self.auto_ack = name is None
        self.consumers: list[Consumer] = []
        self.in_flight: dict[int, tuple[Consumer, float]] = {}
        self.deliveries: dict[int, int] = {}
        self.ready: list[int] = []  # heap of offsets due for redelivery now
        self.delayed: dict[int, float] = {}  # offset -> monotonic time it becomes ready
        self.dirty = False  # cursor changed since the last persist
        self._rr = 0

    def __repr__(self) -> str:
        return (
            f"<Group {self.queue}/{self.name or '(ephemeral)'} floor={self.cursor.ack_floor} "
            f"read={self.read_pos} in_flight={len(self.in_flight)} consumers={len(self.consumers)}>"
        )

    # --- consumers ----------------------------------------------------------

    def attach(self, consumer: Consumer) -> None:
        """Add a consumer (competing with the others)."""
        self.consumers.append(consumer)

    def detach(self, consumer: Consumer) -> None:
        """Remove a consumer; what it held becomes ready for redelivery now."""
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        for offset in consumer.held:
            if self.in_flight.pop(offset, None) is not None:
                heapq.heappush(self.ready, offset)
        consumer.held.clear()

    def in_use(self) -> int:
        """How many consumers hold this group: push subscriptions, and pullers
        with messages in flight. A connection that fetched from a durable stays
        attached to it, but once it has acked what it took it holds nothing,
        so it does not stop a SEEK, a DELETE or a change of filter."""
        return sum(1 for c in self.consumers if c.push or c.held)

    def push_consumers(self) -> list[Consumer]:
        """Consumers that can take a pushed message now, rotated for fairness."""
        n = len(self.consumers)
        if n == 1:
            c = self.consumers[0]
            return [c] if c.push and c.credit > 0 else []
        self._rr = (self._rr + 1) % n if n else 0
        order = self.consumers[self._rr :] + self.consumers[: self._rr]
        return [c for c in order if c.push and c.credit > 0]

    # --- handing out --------------------------------------------------------

    def has_redelivery(self) -> bool:
        """Whether a redelivery is ready now."""
        return bool(self.ready)

    def next_redelivery(self) -> int | None:
        """The offset :meth:`take_redelivery` would hand out now, still ready
        (a FETCH looks at its size before it takes it).

        On the way it drops offsets acked while they waited and moves those
        that used up ``max_deliveries`` to ``dead``, as a take does.
        """
        ready = self.ready
        while ready:
            offset = ready[0]
            if offset < self.cursor.ack_floor or self.cursor.is_acked(offset):
                heapq.heappop(ready)  # acked while it waited
            elif self.max_deliveries and self.deliveries.get(offset, 0) >= self.max_deliveries:
                heapq.heappop(ready)
                self.dead.append((offset, self.deliveries[offset]))
                self.parked.add(offset)
            else:
                return offset
        return None

    def take_redelivery(self, consumer: Consumer, now: float) -> tuple[int, int] | None:
        """Hand the lowest ready redelivery (:meth:`next_redelivery`) to ``consumer``.

        Returns:
            ``(offset, deliveries)`` or None when nothing is ready.
        """
        offset = self.next_redelivery()
        if offset is None:
            return None
        heapq.heappop(self.ready)
        return offset, self._hand_out(consumer, offset, now)

    def take_dead(self) -> list[tuple[int, int]]:
        """The offsets to move to the dead-letter queue now (they stay parked)."""
        dead, self.dead = self.dead, []
        return dead

    def dead_lettered(self, offsets: Iterable[int]) -> None:
        """Their copies are stored in the dead-letter queue: the cursor moves on."""
        for offset in offsets:
            if offset in self.parked:
                self.parked.discard(offset)
                self._acked(offset)

    def dead_letter_failed(self, offsets: Iterable[int]) -> None:
        """Storing the copies failed: keep the messages (redelivered later)."""
        for offset in offsets:
            if offset in self.parked:
                self.parked.discard(offset)
                self.delayed[offset] = 0.0  # ready at the next expire()

    def deliver_new(self, consumer: Consumer, offset: int, now: float) -> int:
        """Hand ``offset`` (== read_pos, matching the filter) to ``consumer``.

        Returns:
            The delivery count (1 unless a restart left it ambiguous).
        """
        self.read_pos = offset + 1
        self.dirty = True  # persist read_pos too: a restart marks these offsets redelivered
        return self._hand_out(consumer, offset, now)

    def passed(self, offset: int) -> bool:
        """Whether ``offset`` (== read_pos) was acked before (out of order, before a
        restart); if so it is stepped over, never handed out again."""
        if offset < self.cursor.ack_floor or (self.cursor.acked and offset in self.cursor.acked):
            self.read_pos = offset + 1
            return True
        return False

    def skip(self, offset: int) -> None:
        """``offset`` (== read_pos) does not match the filter: count it done."""
        self.read_pos = offset + 1
        self._acked(offset)

    def _hand_out(self, consumer: Consumer, offset: int, now: float) -> int:
        n = self.deliveries.get(offset, 0) + 1
        if self.auto_ack:
            self.deliveries.pop(offset, None)
            self._acked(offset)
            return n
        self.deliveries[offset] = n
        self.in_flight[offset] = (consumer, now + self._wait(n))
        consumer.held.add(offset)
        return n

    def _wait(self, deliveries: int) -> float:
        """The ack wait of a message's ``deliveries``-th delivery. Backing off:
        each redelivery doubles it (up to 8x), so a message nobody manages to
        ack comes back ever more rarely."""
        return self.ack_wait * (1 << min(deliveries - 1, MAX_BACKOFF_SHIFT))

    def skip_dropped(self, first: int) -> tuple[int, int] | None:
        """Retention dropped everything below ``first``: count it done.

        Returns:
            ``(from, to)`` of the offsets the durable never got, or None.
        """
        if self.cursor.ack_floor >= first:
            return None
        missed = [o for o in range(self.cursor.ack_floor, first) if not self.cursor.is_acked(o)]
        for offset in missed:
            self._release(offset)
            self.deliveries.pop(offset, None)
            self.delayed.pop(offset, None)
            self.parked.discard(offset)
        self.cursor.ack_upto(first - 1)
        self.read_pos = max(self.read_pos, first)
        self.dirty = True
        if self.name is None or not missed:
            return None
        self.gap = (missed[0], missed[-1])
        return self.gap

    def seek(self, offset: int) -> None:
        """Start again at ``offset``: everything before it counts as done, nothing
        after it is in flight or waiting (the caller checked there are no consumers)."""
        self.cursor = Cursor(offset)
        self.read_pos = offset
        self.in_flight.clear()
        self.deliveries.clear()
        self.ready.clear()
        self.delayed.clear()
        self.parked.clear()
        self.dead.clear()
        self.dirty = True

    # --- acknowledgements ---------------------------------------------------

    def ack(self, offsets: Iterable[int], upto: int | None) -> int:
        """Apply an ACK: single offsets and/or everything up to ``upto``.

        Every valid offset is applied even when others are not: a client
        batches the acks of many messages into one frame, and one stale ack
        (a copy already acked) must not cost the rest theirs.

        Returns:
            How many offsets became acked.

        Raises:
            AckError: some offset was never handed out or is already acked
                (or ``upto`` reaches past what was delivered), raised after
                the valid ones were applied; the message names each one.
        """
        problems: list[str] = []
        valid: list[int] = []
        for offset in offsets:
            if offset in self.parked:
                continue  # being dead-lettered: done soon anyway
            try:
                self._check_ackable(offset)
            except AckError as exc:
                problems.append(str(exc))
            else:
                valid.append(offset)
        done = 0
        for offset in dict.fromkeys(valid):  # an offset twice in one ACK counts once
            self._release(offset)
            self._acked(offset)
            done += 1
        if upto is not None and upto >= self.read_pos:
            problems.append(f"cannot ack up to {upto}: offset {self.read_pos} not delivered yet")
        elif upto is not None and upto >= self.cursor.ack_floor:
            for offset in [o for o in self.in_flight if o <= upto]:
                self._release(offset)
            for offset in [o for o in self.delayed if o <= upto]:
                del self.delayed[offset]
            for offset in [o for o in self.deliveries if o <= upto]:
                del self.deliveries[offset]
            done += upto + 1 - self.cursor.ack_floor
            self.cursor.ack_upto(upto)
            self.dirty = True
        if problems:
            others = f" ({done} others acknowledged)" if done else ""
            raise AckError("; ".join(problems) + others)
        return done

    def nack(self, offsets: Iterable[int], delay: float, now: float) -> None:
        """Give offsets back for redelivery, now or after ``delay`` seconds.

        Raises:
            AckError: an offset is not in flight; nothing is changed.
        """
        offsets = tuple(offsets)
        for offset in offsets:
            if offset not in self.in_flight:
                raise AckError(f"offset {offset} is not in flight for {self.name!r}")
        for offset in offsets:
            self._release(offset)
            if delay > 0:
                self.delayed[offset] = now + delay
            else:
                heapq.heappush(self.ready, offset)

    def extend(self, offsets: Iterable[int], now: float) -> None:
        """Restart the ack wait of in-flight offsets (work in progress), with
        each one's backoff (a redelivery has longer).

        Raises:
            AckError: an offset is not in flight; nothing is changed.
        """
        offsets = tuple(offsets)
        for offset in offsets:
            if offset not in self.in_flight:
                raise AckError(f"offset {offset} is not in flight for {self.name!r}")
        for offset in offsets:
            self.in_flight[offset] = (self.in_flight[offset][0], now + self._wait(self.deliveries.get(offset, 1)))

    def expire(self, now: float) -> int:
        """Move overdue in-flight offsets and due delayed ones to ``ready``.

        Returns:
            How many offsets became ready.
        """
        due = [o for o, (_, deadline) in self.in_flight.items() if deadline <= now]
        for offset in due:
            self._release(offset)
            heapq.heappush(self.ready, offset)
        later = [o for o, t in self.delayed.items() if t <= now]
        for offset in later:
            del self.delayed[offset]
            heapq.heappush(self.ready, offset)
        return len(due) + len(later)

    def _check_ackable(self, offset: int) -> None:
        if offset >= self.read_pos and offset not in self.deliveries:  # (delivered before a restart: ok)
            raise AckError(f"offset {offset} was never delivered to {self.name!r}")
        if offset < self.cursor.ack_floor or self.cursor.is_acked(offset):
            raise AckError(f"offset {offset} is already acknowledged")

    def _release(self, offset: int) -> None:
        entry = self.in_flight.pop(offset, None)
        if entry is not None:
            entry[0].held.discard(offset)

    def _acked(self, offset: int) -> None:
        self.deliveries.pop(offset, None)
        self.delayed.pop(offset, None)
        self.cursor.ack(offset)
        self.dirty = True

    # --- reporting ----------------------------------------------------------

    @property
    def dead_letter_queue(self) -> str:
        """Where its dead letters go: ``dead_letter``, else ``<queue>.dead``."""
        return dead_letter_queue(self.queue, self.dead_letter)

    def lag(self, log_start: int, log_end: int) -> int:
        """Messages not yet acked (including in flight): ``log_end - floor - acked above``,
        from the log's first message if retention dropped some below it."""
        cursor = self.cursor
        if cursor.ack_floor >= log_start:
            return max(0, log_end - cursor.ack_floor - len(cursor.acked))
        return max(0, log_end - log_start - sum(1 for o in cursor.acked if o >= log_start))


def dead_letter_queue(queue: str, named: str | None) -> str:
    """The dead-letter queue of a durable of ``queue``: the one it ``named``, else ``<queue>.dead``."""
    return named or f"{queue}.dead"
