"""One client connection: an ``asyncio.Protocol`` around the sans-I/O Connection.

Why a Protocol and not streams: the broker's work is callback-shaped. Bytes
arrive (``data_received``) and are decoded by the sans-I/O core; the socket's
write buffer crosses its high-water mark (``pause_writing``) and the
subscriptions on this connection must stop taking messages at once, not when a
drain task next runs. Streams would add a reader task and a drain task per
connection to get the same two signals.

Flow control, both ways:

* Out: while the transport is over ``write_high_water`` every consumer of this
  session is paused (it keeps its place in the log; nothing is buffered for
  it) and we stop reading the peer's requests too, so a client that never
  reads cannot make us queue replies. Paused longer than
  ``slow_consumer_timeout``: ERR SLOW_CONSUMER and the connection is dropped.
* In: more than ``max_inflight_publishes`` unconfirmed publishes stops
  reading from the socket until confirms catch up, so TCP slows a publisher
  when storage falls behind.

The publish path (batching per read, deduplication, confirms) is the base
class, :class:`broker.publishing.Publishing`, and so is the loop that
dispatches a read's events (``_dispatch``), which handles the common
PUBLISH inline.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Connection,
    Delete,
    ErrorCode,
    EventFilter,
    Fetch,
    Frame,
    Hello,
    InvalidRequest,
    LocalProtocolError,
    Nack,
    Ok,
    Ping,
    Pong,
    Progress,
    Publish,
    RemoteProtocolError,
    Role,
    Seek,
    State,
    Status,
    StatusReply,
    Subscribe,
    Unsubscribe,
    Welcome,
    encode_batch,
)
from protocol.framing import pack_body

from . import faults
from .cursors import Cursor
from .publishing import SEQUENCE_HEADER_ROOM, Pending, Publishing
from .queue import FetchWaiter, Queue
from .router import AckError, Consumer, Group
from .status import StatusPageError
from .users import User

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["Session"]

logger = logging.getLogger(__name__)

#: Pull consumers hold at most this many unacked fetched messages per durable
#: and connection; a FETCH beyond it gets what redeliveries free up.
PULL_MAX_UNACKED = 100_000


class _Push:
    """The PushTarget of one push subscription: its id and its session."""

    __slots__ = ("session", "sub_id")

    def __init__(self, session: Session, sub_id: int) -> None:
        self.session = session
        self.sub_id = sub_id

    def write(self, data: bytes) -> None:
        self.session.write(data)

    def __repr__(self) -> str:
        return f"sub {self.sub_id} of conn {self.session.conn_id}"


class _Sub:
    """A push subscription of this session."""

    __slots__ = ("consumer", "group", "queue", "sub_id")

    def __init__(self, sub_id: int, queue: Queue, group: Group, consumer: Consumer) -> None:
        self.sub_id = sub_id
        self.queue = queue
        self.group = group
        self.consumer = consumer


class Session(Publishing, asyncio.Protocol):
    """The broker's side of one connection.

    Args:
        broker: the broker that accepted the connection.
    """

    def __init__(self, broker: Broker) -> None:
        # Mind the count (tests/broker/test_session.py checks it): CPython 3.11
        # keeps fewer than 30 instance attributes of a class in its fast
        # layout. The 30th cost every attribute access of the publish path:
        # +3,900 instructions per window-1 publish in bench.instructions.
        self.broker = broker
        self.config = broker.config
        self.conn = Connection(Role.BROKER, limits=broker.config.limits)
        self.conn_id = broker.next_conn_id()
        self.name = ""
        #: The producer id from HELLO: this session's PUBLISH reqs are its sequence.
        self.producer: str | None = None
        self.user: User | None = None
        self.peer = "?"
        self.since = time.time()
        self.transport: asyncio.Transport | None = None
        self.subs: dict[int, _Sub] = {}
        self.pullers: dict[tuple[str, str], tuple[Queue, Group, Consumer]] = {}
        self.closed = False
        self.write_paused = False
        self.unconfirmed = 0
        self._bye = False
        #: A wrong token's AUTH_FAILED waits on ``_timer`` (see _auth_failed).
        self._refusing = False
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None
        #: The deadline close() gives the write buffer to drain (or a BYE gives
        #: the replies, see _on_bye), and the one a full buffer gives the
        #: reader (pause_writing): both cancelled once the connection is gone,
        #: so a closed transport is freed at once.
        self._abort: asyncio.TimerHandle | None = None
        self._slow: asyncio.TimerHandle | None = None
        #: Heartbeat checks since bytes last arrived (see _heartbeat): the read
        #: path's one job for the heartbeat is to zero it (any frame, or part
        #: of one, is a sign of life).
        self._silent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: dict[Queue, Pending] = {}
        self._now_ms = 0
        self._stamp = b""
        self._max_record = self.config.max_message_bytes
        self._queues = broker.store.queues
        self._handlers: dict[type[Any], Any] = {
            Publish: self._on_publish,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
            Ack: self._on_ack,
            Nack: self._on_nack,
            Progress: self._on_progress,
            Delete: self._on_delete,
            Seek: self._on_seek,
            Fetch: self._on_fetch,
            Status: self._on_status,
            Ping: self._on_ping,
            Pong: self._on_pong,
            Hello: self._on_hello,
            Bye: self._on_bye,
            InvalidRequest: self._on_invalid,
        }

    def __repr__(self) -> str:
        return f"<Session {self.conn_id} {self.name!r} {self.peer} {self.conn.state.value} subs={len(self.subs)}>"

    # --- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        high = self.config.write_high_water
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if not self.broker.register(self):
            # At once, not as the answer to HELLO (SPEC 3, item 2): waiting would
            # let every connection over the limit hold a socket for the
            # handshake timeout. The close stops reading: nothing of it is read.
            self.fatal(ErrorCode.TOO_MANY_CONNECTIONS, "the broker has reached its connection limit")
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._silent = 0
        # One clock read per chunk, for every record in it.
        self._now_ms = now_ms = self.broker.store.now_ms()
        self._stamp = pack_body(now_ms) + b"\xc0"
        try:
            self.conn.receive_data(data)
            try:
                events = self.conn.events_spliced()
            except RemoteProtocolError as exc:
                self._dispatch(exc.before)  # requests sent before the bad bytes get their answers first
                self.fatal(exc.code, str(exc))
                return
            self._dispatch(events)
        except Exception:  # a bug of ours outside any one handler (_dispatch catches theirs)
            self.internal_error(0)

    def eof_received(self) -> bool | None:
        # After its BYE a peer may shut its side (a half-close): what it is
        # owed still goes out, and _on_bye closes ours. Otherwise close ours too.
        return True if self._bye else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._timer, self._abort, self._slow):
            if timer is not None:
                timer.cancel()
        self._stop_consuming(answer_fetches=False)
        self.broker.unregister(self)
        logger.debug("conn %d %s closed: %s", self.conn_id, self.peer, exc or "clean")

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

    def pause_writing(self) -> None:
        self.write_paused = True
        self._set_paused(True)
        assert self.transport is not None
        self.transport.pause_reading()
        if self._slow is None:
            self._slow = asyncio.get_running_loop().call_later(self.config.slow_consumer_timeout, self._check_slow)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._slow is not None:
            self._slow.cancel()
            self._slow = None
        self._set_paused(False)
        if not self._reading_paused and not self._bye and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        now = time.monotonic()
        for sub in list(self.subs.values()):
            sub.queue.pump(sub.group, now)

    # --- output -------------------------------------------------------------

    def fatal(self, code: ErrorCode, message: str) -> None:
        """Send ERR with a connection-level code, then close."""
        if self.closed or self.transport is None:
            return
        logger.info("conn %d %s: closing: %s (%s)", self.conn_id, self.peer, message, code.name)
        self.transport.write(self.conn.send_error(0, code, message))
        self.close()

    def send_later(self, frame: Frame) -> None:
        """Send ``frame`` outside the handling of a request (a DELETE that
        finished on a worker thread, a heartbeat): nothing once the connection
        has broken the protocol (a fatal ERR went out; the close may wait for a
        full buffer to drain) or is gone."""
        if not self.closed and self.conn.state in (State.READY, State.CLOSING):
            self.write(self.conn.send(frame))

    def internal_error(self, req: int) -> None:
        """A bug of ours met this connection's request ``req`` (0: none in
        particular): log it with its traceback, answer ERR INTERNAL, close.

        Called from an ``except`` block. Only this connection ends: what it
        had in flight may be half done, so the client reconnects and resends
        (a resent PUBLISH is deduplicated as after any drop); every other
        connection and the stored data are untouched.
        """
        logger.exception("conn %d %s: internal error handling request %d", self.conn_id, self.peer, req)
        if self.closed or self.transport is None:
            return
        message = "internal error (a broker bug, logged there); the connection is closed"
        self.transport.write(self.conn.send_error(req, ErrorCode.INTERNAL, message))
        self.close()

    def close(self, *, abort_after: float = 1.0) -> None:
        """Close after the write buffer drains; abort if it has not within
        ``abort_after`` (or by the deadline a BYE set, if that came first)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self._abort is None:
            self._abort = asyncio.get_running_loop().call_later(abort_after, transport.abort)

    def close_if_answered(self) -> None:
        """After a BYE: close once every request before it has its answer (see _on_bye)."""
        if self._bye and not self.unconfirmed and not self._tasks:
            self.close()

    # --- timers -------------------------------------------------------------

    def _handshake_expired(self) -> None:
        if self.conn.state is not State.READY:
            self.fatal(ErrorCode.HANDSHAKE_TIMEOUT, "no HELLO within the handshake timeout")

    def _heartbeat(self) -> None:
        """Every ``heartbeat`` seconds after WELCOME: PING after one silent
        interval, HEARTBEAT_TIMEOUT after two in a row (SPEC 3.3).

        Anything received ends a silence, not only a PONG: a peer busy
        sending PUBLISHes or its own PINGs is alive. The read path only zeroes
        ``_silent``; the counting is here, once an interval: 1 means something
        arrived during the interval, 2 one silent interval, 3 two in a row.
        """
        if self.closed:
            return
        self._silent += 1
        if self._silent >= 3:
            self.fatal(ErrorCode.HEARTBEAT_TIMEOUT, "nothing received for two heartbeat intervals")
            return
        if self._silent == 2:
            self.send_later(Ping(0))
        self._timer = asyncio.get_running_loop().call_later(self.config.heartbeat, self._heartbeat)

    def _check_slow(self) -> None:
        """The write buffer has been full for slow_consumer_timeout without a break: drop the reader."""
        self._slow = None
        transport = self.transport
        if self.write_paused and transport is not None and not self.closed:
            size = transport.get_write_buffer_size()
            logger.warning("conn %d %s: slow consumer, %d bytes pending", self.conn_id, self.peer, size)
            transport.write(self.conn.send_error(0, ErrorCode.SLOW_CONSUMER, f"{size} bytes unread for too long"))
            transport.abort()

    def _set_paused(self, paused: bool) -> None:
        for sub in self.subs.values():
            sub.consumer.paused = paused

    # --- handshake and lifecycle ----------------------------------------------

    def _auth_failed(self) -> None:
        """AUTH_FAILED and close: at once, or after the delay repeated failures
        from this address earn (reading stops meanwhile; see Broker.auth_failed)."""
        host, colon, _ = self.peer.rpartition(":")  # (failures are counted per host)
        delay = self.broker.auth_failed(host if colon else self.peer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay <= 0 or self.transport is None:
            self.fatal(ErrorCode.AUTH_FAILED, "invalid or missing token")
            return
        self.transport.pause_reading()
        self._refusing = True
        self._timer = asyncio.get_running_loop().call_later(
            delay, self.fatal, ErrorCode.AUTH_FAILED, "invalid or missing token"
        )

    def _on_hello(self, ev: Hello) -> None:
        if ev.version != PROTOCOL_VERSION:
            self.fatal(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {ev.version} is not supported (this broker speaks {PROTOCOL_VERSION})",
            )
            return
        given = (ev.credentials or {}).get("token")
        users, token = self.broker.users, self.config.token
        if users is not None:
            self.user = users.authenticate(given)
            if self.user is None:
                self._auth_failed()
                return
        elif token is not None and (
            not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode())
        ):
            self._auth_failed()
            return
        self.name = ev.name
        self.producer = ev.producer
        if ev.producer is not None:  # room for the x-producer-seq header
            self._max_record = self.config.max_message_bytes - SEQUENCE_HEADER_ROOM
        if self._timer is not None:
            self._timer.cancel()
        cfg = self.config
        self.write(
            self.conn.send(
                Welcome(ev.req, PROTOCOL_VERSION, self.broker.version, self.conn_id,
                        cfg.limits.max_frame_size, cfg.heartbeat)
            )
        )  # fmt: skip
        if cfg.heartbeat > 0:
            self._timer = asyncio.get_running_loop().call_later(cfg.heartbeat, self._heartbeat)
        logger.debug("conn %d %s: hello from %r", self.conn_id, self.peer, ev.name)

    def _on_bye(self, ev: Bye) -> None:
        """The peer is done (SPEC 3, item 4): answer what it sent before, then close.

        Nothing more is read (the Connection drops what follows the BYE; the
        socket stops being read). The subscriptions end now, so no DELIVER
        follows, and what they held goes back to the durables as on a
        disconnect; a FETCH still waiting gets its empty BATCH now. The
        connection stays until the other replies it owes are written: the
        PUBACKs waiting for their fsync and a DELETE's OK (``unconfirmed``
        and ``_tasks``; close_if_answered is called as each kind runs out).
        ``shutdown_grace`` after the BYE the connection is aborted whatever
        is still owed or unwritten, so a stuck fsync cannot hold it.
        """
        self._bye = True
        if self._refusing:
            return  # the AUTH_FAILED it is owed is on its way (_auth_failed), and then the close
        assert self.transport is not None
        self.transport.pause_reading()
        if self._timer is not None:  # the handshake's or the heartbeat's: neither applies now
            self._timer.cancel()
            self._timer = None
        self._stop_consuming(answer_fetches=True)
        if self._abort is None:
            self._abort = asyncio.get_running_loop().call_later(self.config.shutdown_grace, self._bye_expired)
        self.close_if_answered()

    def _bye_expired(self) -> None:
        """``shutdown_grace`` after a BYE the connection is not gone yet: abort it."""
        if self.transport is None or self.closed:
            return
        owed = self.unconfirmed + len(self._tasks)
        if owed:
            logger.warning(
                "conn %d %s: closing with %d replies still owed %.1f s after its BYE",
                self.conn_id, self.peer, owed, self.config.shutdown_grace,
            )  # fmt: skip
        self.transport.abort()

    def _on_ping(self, ev: Ping) -> None:
        self.write(self.conn.send(Pong(ev.req)))

    def _on_pong(self, ev: Pong) -> None:
        pass  # its arrival was the sign of life (_silent zeroed); nothing else to do

    def _on_invalid(self, ev: InvalidRequest) -> None:
        self.reply_error(ev.req, ev.code, ev.message)

    def _on_status(self, ev: Status) -> None:
        faults.hit("status")
        if self.user is not None and not self.user.status:
            self.reply_error(ev.req, ErrorCode.PERMISSION_DENIED, f"user {self.user.name!r} may not ask for STATUS")
            return
        try:
            reply = self.conn.send(StatusReply(ev.req, self.broker.status(ev.page)))
        except StatusPageError as exc:
            self.reply_error(ev.req, ErrorCode.BAD_REQUEST, str(exc))
            return
        except LocalProtocolError as exc:  # a frame limit too small for even one entry
            self.reply_error(ev.req, ErrorCode.BAD_REQUEST, f"the status does not fit in a frame: {exc}")
            return
        self.write(reply)

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
        group = queue.groups.get(name)
        if group is None:
            pos = self._start_offset(queue, start, start_value)
            group = Group(queue.name, name, events, Cursor(pos), pos, ack_wait=ack_wait or 30.0,
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
            group.filter = EventFilter(events)
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
        self.subs[ev.sub_id] = _Sub(ev.sub_id, queue, group, consumer)
        self.write(self.conn.send(Ok(ev.req)))
        queue.pump(group, time.monotonic())

    def _dead_letter_queue(self, ev: Subscribe) -> str:
        """The queue a durable subscription's dead letters would go to."""
        if ev.dead_letter is not None:
            return ev.dead_letter
        queue = self._queues.get(ev.queue)
        group = queue.groups.get(ev.durable) if queue is not None and ev.durable is not None else None
        return (group.dead_letter if group is not None else None) or f"{ev.queue}.dead"

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
        if busy := group.in_use():
            self.reply_error(ev.req, ErrorCode.CONFLICT, f"durable {ev.durable!r} is in use by {busy} consumers")
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
            if busy := group.in_use():
                self.reply_error(ev.req, ErrorCode.CONFLICT, f"durable {ev.durable!r} is in use by {busy} consumers")
                return
            done = store.delete_durable(queue, ev.durable)
        else:
            busy = sum(g.in_use() for g in queue.groups.values()) + len(queue.ephemeral) + len(queue.waiters)
            if busy:
                self.reply_error(ev.req, ErrorCode.CONFLICT, f"queue {ev.queue!r} is in use by {busy} readers")
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
            self.reply_error(ev.req, ErrorCode.STORAGE_FAILED, f"cannot delete: {exc}")
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
                consumer = Consumer(None, PULL_MAX_UNACKED, push=False)
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
                filter=EventFilter(ev.events),
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

    # --- status -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """This connection as STATUS reports it."""
        return {
            "id": self.conn_id,
            "name": self.name,
            "address": self.peer,
            "since": self.since,
            "producer": self.producer,
            "user": self.user.name if self.user is not None else None,
            "subscriptions": [
                {
                    "sub_id": s.sub_id,
                    "queue": s.queue.name,
                    "events": list(s.group.filter.patterns),
                    "durable": s.group.name,
                    "prefetch": s.consumer.prefetch,
                    "in_flight": len(s.consumer.held),
                }
                for s in self.subs.values()
            ],
            "pulls": [{"queue": q, "durable": d} for q, d in self.pullers],
        }
