"""A session's consuming side, a base class of :class:`broker.session.Session`.

Push subscriptions (SUBSCRIBE, UNSUBSCRIBE), pulls (FETCH, long-polled),
the acks that answer both (ACK, NACK, PROGRESS), and the admin requests on
durables and queues (SEEK, DELETE). A durable is one :class:`Group` per
(queue, name) shared by every connection that uses it; this connection's
part of it is a :class:`Consumer`, per push subscription (``subs``) or per
durable it fetches from (``pullers``). When the connection ends, or says
BYE, its consumers are detached and what they held unacknowledged goes
back to the group (:meth:`Consuming._stop_consuming`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from protocol import (
    Ack,
    Delete,
    ErrorCode,
    Fetch,
    Frame,
    Nack,
    Ok,
    Progress,
    Seek,
    Subscribe,
    Unsubscribe,
    encode_batch,
    subscription_filter,
)
from protocol.wording import many

from .cursors import Cursor
from .publishing import Publishing
from .queue import FetchWaiter, Queue
from .router import DEFAULT_ACK_WAIT, AckError, Consumer, Group, dead_letter_queue
from .segment import for_clients

if TYPE_CHECKING:
    from .users import User

__all__ = ["Consuming"]

logger = logging.getLogger("broker.session")  # (one logger for a connection's lines)

#: Pull consumers hold at most this many unacked fetched messages per durable
#: and connection; a FETCH beyond it gets what redeliveries free up.
PULL_MAX_UNACKED = 100_000


class _Push:
    """The PushTarget of one push subscription: its id and its session."""

    __slots__ = ("session", "sub_id")

    def __init__(self, session: Consuming, sub_id: int) -> None:
        self.session = session
        self.sub_id = sub_id

    def write(self, data: bytes) -> None:
        self.session.write(data)

    def __repr__(self) -> str:
        return f"sub {self.sub_id} of conn {self.session.conn_id}"


class PushSub:
    """A push subscription of this session."""

    __slots__ = ("consumer", "group", "queue", "sub_id")

    def __init__(self, sub_id: int, queue: Queue, group: Group, consumer: Consumer) -> None:
        self.sub_id = sub_id
        self.queue = queue
        self.group = group
        self.consumer = consumer


#: A CONFLICT names at most this many of the consumers that hold a durable.
NAMED_HOLDERS = 5


def _in_use(group: Group) -> str:
    """Why a durable cannot be moved or deleted now: the consumers that hold
    it, each with its connection, so that an operator knows which to stop::

        durable 'hd' is in use by 2 consumers: conn 3 'api' (subscription 1),
        conn 7 'worker' (1 fetched message unacked)
    """
    holders = [c for c in group.consumers if c.push or c.held]
    named = []
    for consumer in holders[:NAMED_HOLDERS]:
        if isinstance(consumer.owner, _Push):
            session, what = consumer.owner.session, f"subscription {consumer.owner.sub_id}"
        else:  # a connection's pulls: its Consuming (see _on_fetch)
            assert isinstance(consumer.owner, Consuming)
            session, what = consumer.owner, f"{many(len(consumer.held), 'fetched message')} unacked"
        named.append(f"conn {session.conn_id} {session.name!r} ({what})")
    more = f" and {len(holders) - NAMED_HOLDERS} more" if len(holders) > NAMED_HOLDERS else ""
    return f"durable {group.name!r} is in use by {many(len(holders), 'consumer')}: {', '.join(named)}{more}"


class Consuming(Publishing):
    """The consuming requests of a session (see the module docstring); Session sets the state."""

    conn_id: int
    name: str
    subs: dict[int, PushSub]
    pullers: dict[tuple[str, str], tuple[Queue, Group, Consumer]]
    _tasks: set[asyncio.Task[None]]

    if TYPE_CHECKING:  # Session's

        def _set_paused(self, paused: bool) -> None: ...
        def send_later(self, frame: Frame) -> None: ...

    def _stop_consuming(self, *, answer_fetches: bool) -> None:
        """End this connection's subscriptions and pulls (it closed, or said
        BYE): what they held unacknowledged goes back to their durables, for
        their other consumers. A FETCH still waiting is answered now with an
        empty BATCH (``answer_fetches``) or forgotten."""
        # Detaching one subscription pumps its group: neither this connection's
        # other subscriptions nor its FETCHes may take what it gives back.
        self._set_paused(True)
        for queue in self._queues.values():
            if queue.waiters:
                queue.drop_waiters(self.write, answer=answer_fetches)
        for sub in self.subs.values():
            self._detach(sub.queue, sub.group, sub.consumer)
        self.subs.clear()
        for queue, group, consumer in self.pullers.values():
            self._detach(queue, group, consumer)
        self.pullers.clear()

    # --- subscriptions ----------------------------------------------------------

    def _start_offset(self, queue: Queue, start: str, value: int | None) -> int:
        log = queue.log
        if start == "earliest":
            return log.first_offset
        if start == "offset":
            assert value is not None
            return min(max(value, log.first_offset), log.next_offset)
        if start == "time":
            assert value is not None
            return log.offset_for_time(value)
        return log.next_offset

    def _durable(self, req: int, queue: Queue, name: str, events: tuple[str, ...],
                 start: str, start_value: int | None, ack_wait: float,
                 max_deliveries: int = 0, dead_letter: str | None = None) -> Group | None:  # fmt: skip
        # ack_wait 0 (ack_wait_ms 0) asks for the default, for a new durable,
        # and keeps an existing one's; any other value is at least 1 ms
        # (MIN_ACK_WAIT): the wire counts whole milliseconds.
        group = queue.groups.get(name)
        if group is None:
            pos = self._start_offset(queue, start, start_value)
            group = Group(queue.name, name, events, Cursor(pos), pos, ack_wait=ack_wait or DEFAULT_ACK_WAIT,
                          max_deliveries=max_deliveries, dead_letter=dead_letter)  # fmt: skip
            group.dirty = True
            queue.groups[name] = group
            return group
        if max_deliveries:
            group.max_deliveries = max_deliveries
            group.dirty = True
        if dead_letter is not None:
            group.dead_letter = dead_letter
            group.dirty = True
        # An existing durable keeps its filter when none is given (a FETCH need
        # not repeat it); to widen it to every event, pass ["*"].
        if events and set(group.filter.patterns) != set(events):
            if group.in_use():
                self.reply_error(
                    req,
                    ErrorCode.CONFLICT,
                    f"durable {name!r} is in use with events {list(group.filter.patterns)}; "
                    f"cannot attach with {list(events)}",
                )
                return None
            group.filter = subscription_filter(events)
            group.dirty = True
        if ack_wait:
            group.ack_wait = ack_wait
        return group

    def _on_subscribe(self, ev: Subscribe) -> None:
        if ev.sub_id in self.subs:
            self.reply_error(ev.req, ErrorCode.DUPLICATE_SUBSCRIPTION, f"subscription {ev.sub_id} exists")
            return
        if self.denied(ev.req, "subscribe", ev.queue) or (
            ev.durable is not None
            and (ev.max_deliveries or ev.dead_letter is not None)
            and self.denied(ev.req, "publish", self._dead_letter_queue(ev))
        ):
            return
        queue = self._queue(ev.req, ev.queue)
        if queue is None:
            return
        ack_wait = ev.ack_wait_ms / 1000.0
        if ev.durable is not None:
            group = self._durable(ev.req, queue, ev.durable, ev.events, ev.start, ev.start_value, ack_wait,
                                  ev.max_deliveries, ev.dead_letter)  # fmt: skip
            if group is None:
                return
        else:
            pos = self._start_offset(queue, ev.start, ev.start_value)
            group = Group(queue.name, None, ev.events, Cursor(pos), pos)
            queue.ephemeral.add(group)
        consumer = Consumer(_Push(self, ev.sub_id), ev.prefetch)
        consumer.paused = self.write_paused
        group.attach(consumer)
        self.subs[ev.sub_id] = PushSub(ev.sub_id, queue, group, consumer)
        self.write(self.conn.send(Ok(ev.req)))
        queue.pump(group, time.monotonic())

    def consumes_within(self, user: User) -> bool:
        """Whether ``user`` may still do what this connection is doing: read
        each queue it subscribed to or fetched from, and write each dead-letter
        queue its durables' subscriptions may fill. Its other requests are
        checked as they come, so rights narrowed elsewhere (a users reload)
        need not end the connection."""
        for sub in self.subs.values():
            group = sub.group
            if not user.subscribe(group.queue) or (group.max_deliveries and not user.publish(group.dead_letter_queue)):
                return False
        return all(user.subscribe(queue.name) for queue, _, _ in self.pullers.values())

    def _dead_letter_queue(self, ev: Subscribe) -> str:
        """The queue a durable subscription's dead letters would go to."""
        if ev.dead_letter is not None:
            return ev.dead_letter
        queue = self._queues.get(ev.queue)
        group = queue.groups.get(ev.durable) if queue is not None and ev.durable is not None else None
        return group.dead_letter_queue if group is not None else dead_letter_queue(ev.queue, None)

    def _on_unsubscribe(self, ev: Unsubscribe) -> None:
        sub = self.subs.pop(ev.sub_id, None)
        if sub is None:
            self.reply_error(ev.req, ErrorCode.UNKNOWN_SUBSCRIPTION, f"no subscription {ev.sub_id}")
            return
        self._detach(sub.queue, sub.group, sub.consumer)
        self.write(self.conn.send(Ok(ev.req)))

    def _detach(self, queue: Queue, group: Group, consumer: Consumer) -> None:
        group.detach(consumer)
        if group.name is None:
            queue.ephemeral.discard(group)
        elif (group.consumers or group.ready) and not self.broker.closing:  # (its logs may be closed)
            queue.pump(group, time.monotonic())
            if queue.waiters:
                queue.serve_waiters()

    # --- acks -------------------------------------------------------------------

    def _group(self, req: int, queue_name: str, durable: str) -> tuple[Queue, Group] | None:
        if self.denied(req, "subscribe", queue_name):  # (before NOT_FOUND: no probing)
            return None
        queue = self.broker.store.queues.get(queue_name)
        group = queue.groups.get(durable) if queue is not None else None
        if queue is None or group is None:
            self.reply_error(req, ErrorCode.NOT_FOUND, f"no durable {durable!r} on queue {queue_name!r}")
            return None
        return queue, group

    def _on_ack(self, ev: Ack) -> None:
        found = self._group(ev.req, ev.queue, ev.durable)
        if found is None:
            return
        queue, group = found
        try:
            group.ack(ev.offsets, ev.upto)
        except AckError as exc:  # the valid offsets were applied all the same
            self.reply_error(ev.req, ErrorCode.BAD_ACK, str(exc))
        else:
            if ev.req:
                self.write(self.conn.send(Ok(ev.req)))
        # Refill once the rest of this read is handled: acks written with an
        # UNSUBSCRIBE (a closing subscriber's last ones) must not bring it
        # more messages, which would go back unseen with a delivery counted.
        asyncio.get_running_loop().call_soon(self._pump_acked, queue, group)

    def _pump_acked(self, queue: Queue, group: Group) -> None:
        if not self.broker.closing and self.broker.store.queues.get(queue.name) is queue:
            queue.pump(group, time.monotonic())

    def _on_nack(self, ev: Nack) -> None:
        found = self._group(ev.req, ev.queue, ev.durable)
        if found is None:
            return
        queue, group = found
        try:
            group.nack(ev.offsets, ev.delay_ms / 1000.0, time.monotonic())
        except AckError as exc:
            self.reply_error(ev.req, ErrorCode.BAD_ACK, str(exc))
            return
        if ev.req:
            self.write(self.conn.send(Ok(ev.req)))
        if ev.delay_ms == 0:
            queue.pump(group, time.monotonic())
            if queue.waiters:
                queue.serve_waiters()

    def _on_progress(self, ev: Progress) -> None:
        found = self._group(ev.req, ev.queue, ev.durable)
        if found is None:
            return
        try:
            found[1].extend(ev.offsets, time.monotonic())
        except AckError as exc:
            self.reply_error(ev.req, ErrorCode.BAD_ACK, str(exc))
            return
        if ev.req:
            self.write(self.conn.send(Ok(ev.req)))

    def _on_seek(self, ev: Seek) -> None:
        found = self._group(ev.req, ev.queue, ev.durable)
        if found is None:
            return
        queue, group = found
        if group.in_use():
            self.reply_error(ev.req, ErrorCode.CONFLICT, _in_use(group))
            return
        offset = self._start_offset(queue, ev.start, ev.start_value)
        group.seek(offset)
        logger.info("conn %d: durable %s/%s moved to offset %d", self.conn_id, ev.queue, ev.durable, offset)
        self.write(self.conn.send(Ok(ev.req)))

    def _on_delete(self, ev: Delete) -> None:
        if self.denied(ev.req, "delete", ev.queue):
            return
        store = self.broker.store
        queue = store.queues.get(ev.queue)
        if queue is None:
            if ev.durable is None and ev.queue in store.failed:  # refused at start-up: its files can go
                self._delete_then_answer(ev, store.delete_failed(ev.queue))
                return
            self.reply_error(ev.req, ErrorCode.NOT_FOUND, f"no queue {ev.queue!r}")
            return
        if ev.durable is not None:
            group = queue.groups.get(ev.durable)
            if group is None:
                self.reply_error(ev.req, ErrorCode.NOT_FOUND, f"no durable {ev.durable!r} on queue {ev.queue!r}")
                return
            if group.in_use():
                self.reply_error(ev.req, ErrorCode.CONFLICT, _in_use(group))
                return
            done = store.delete_durable(queue, ev.durable)
        else:
            busy = sum(g.in_use() for g in queue.groups.values()) + len(queue.ephemeral) + len(queue.waiters)
            if busy:
                self.reply_error(ev.req, ErrorCode.CONFLICT, f"queue {ev.queue!r} is in use by {many(busy, 'reader')}")
                return
            if queue.committed < queue.log.next_offset:
                self.reply_error(ev.req, ErrorCode.CONFLICT, f"queue {ev.queue!r} has publishes in flight; retry")
                return
            done = store.delete_queue(ev.queue)
        self._delete_then_answer(ev, done)

    def _delete_then_answer(self, ev: Delete, done: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(self._deleted(ev, done))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._bye:
            self.close_if_answered()

    async def _deleted(self, ev: Delete, done: Awaitable[None]) -> None:
        try:
            await done
        except OSError as exc:
            logger.error("conn %d: deleting %s failed: %s", self.conn_id, ev.queue, exc)
            why = for_clients(exc, self.broker.store.queues_dir)
            self.reply_error(ev.req, ErrorCode.STORAGE_FAILED, f"cannot delete: {why}")
            return
        logger.info("conn %d: deleted %s%s", self.conn_id, ev.queue, f"/{ev.durable}" if ev.durable else "")
        self.send_later(Ok(ev.req))

    # --- fetch ------------------------------------------------------------------

    def _on_fetch(self, ev: Fetch) -> None:
        if self.denied(ev.req, "subscribe", ev.queue):
            return
        if ev.max_messages == 0:  # (before the queue is created)
            self.reply_error(ev.req, ErrorCode.BAD_REQUEST, "max_messages must be at least 1")
            return
        if ev.durable is None and ev.wait_ms == 0 and not self.broker.store.known(ev.queue):
            self.write(encode_batch(ev.req, 0, []))  # as if empty, and not created: a typo leaves nothing behind
            return
        queue = self._queue(ev.req, ev.queue)
        if queue is None:
            return
        if ev.durable is not None:
            group = self._durable(
                ev.req, queue, ev.durable, ev.events, ev.start, ev.start_value, ev.ack_wait_ms / 1000.0
            )
            if group is None:
                return
            key = (queue.name, ev.durable)
            puller = self.pullers.get(key)
            if puller is None or puller[1] is not group:
                consumer = Consumer(self, PULL_MAX_UNACKED, push=False)  # (its owner, for _in_use)
                group.attach(consumer)
                puller = self.pullers[key] = (queue, group, consumer)
            waiter = FetchWaiter(
                ev.req, self.write, ev.max_messages, max_frame=self.conn.max_frame_size, group=group, consumer=puller[2]
            )
        else:
            waiter = FetchWaiter(
                ev.req,
                self.write,
                ev.max_messages,
                max_frame=self.conn.max_frame_size,
                position=self._start_offset(queue, ev.start, ev.start_value),
                filter=subscription_filter(ev.events),
            )
        frame = queue.take_for_fetch(waiter, time.monotonic())
        if frame is not None:
            self.write(frame)
        elif ev.wait_ms == 0:
            position = waiter.group.read_pos if waiter.group is not None else waiter.position
            self.write(encode_batch(ev.req, position, []))
        else:
            queue.waiters.append(waiter)
            waiter.timer = asyncio.get_running_loop().call_later(ev.wait_ms / 1000.0, queue.expire_waiter, waiter)
