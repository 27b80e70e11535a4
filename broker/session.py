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

The publish path (batching per read, deduplication, confirms) is a base
class, :class:`broker.publishing.Publishing`, and so is the loop that
dispatches a read's events (``_dispatch``), which handles the common
PUBLISH inline; subscriptions, FETCH, acks, SEEK and DELETE are the other,
:class:`broker.consuming.Consuming`. This module keeps the connection
itself: its lifecycle, handshake, timers, flow control and STATUS.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Connection,
    Delete,
    ErrorCode,
    Fetch,
    Frame,
    Hello,
    InvalidRequest,
    LocalProtocolError,
    Nack,
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
)
from protocol.framing import pack_body
from protocol.wording import many

from . import faults
from .consuming import Consuming, PushSub
from .publishing import SEQUENCE_HEADER_ROOM, Pending
from .queue import Queue
from .router import Consumer, Group
from .status import StatusPageError
from .users import Login

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["Session"]

logger = logging.getLogger(__name__)


class Session(Consuming, asyncio.Protocol):
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
        self.conn = Connection(Role.BROKER, limits=broker.limits)
        self.conn_id = broker.next_conn_id()
        self.name = ""
        #: The producer id from HELLO: this session's PUBLISH reqs are its sequence.
        self.producer: str | None = None
        #: Who authenticated, with which token (a reload checks both); None without users.
        self.user: Login | None = None
        self.peer = "?"
        self.since = time.time()
        self.transport: asyncio.Transport | None = None
        self.subs: dict[int, PushSub] = {}
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
        # owed still goes out, and _on_bye closes ours. Otherwise close ours
        # too. TLS has no half-close (asyncio warns, once per connection, that
        # True has no effect there): the transport closes either way.
        return True if self._bye and not self.config.tls else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._timer, self._abort, self._slow):
            if timer is not None:
                timer.cancel()
        self._stop_consuming(answer_fetches=False)
        self.broker.unregister(self)
        logger.debug("conn %d %s closed: %s", self.conn_id, self.peer, exc or "clean")

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

    def fatal(self, code: ErrorCode, message: str, *, log_level: int = logging.INFO) -> None:
        """Send ERR with a connection-level code, then close.

        Args:
            code: the ERR's code.
            message: the ERR's message, logged too.
            log_level: the level of that line (a refused token is logged,
                once per burst, by :class:`broker.auth.AuthFailures`).
        """
        if self.closed or self.transport is None:
            return
        logger.log(log_level, "conn %d %s: closing: %s (%s)", self.conn_id, self.peer, message, code.name)
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

        While reading is paused (the peer's buffer is full, or its publishes
        wait for a commit) its frames wait in the socket, unheard: that is no
        silence. A peer that reads nothing meets ``slow_consumer_timeout``.
        """
        if self.closed:
            return
        if self.write_paused or self._reading_paused:
            self._silent = 0
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

    def _auth_failed(self, given: object) -> None:
        """AUTH_FAILED and close: at once, or after the delay repeated failures
        from this address earn (reading stops meanwhile; see broker.auth,
        which logs the failure too)."""
        host, colon, _ = self.peer.rpartition(":")  # (failures are counted per host)
        why = "no token" if given is None else "a wrong token"
        delay = self.broker.auth_failures.failed(host if colon else self.peer, self.conn_id, self.peer, why)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        why = (
            "this broker requires a token and none was given (tidings --token or $TIDINGS_TOKEN, Client(token=...))"
            if given is None
            else "wrong token"
        )
        if delay <= 0 or self.transport is None:
            self._refuse(why)
            return
        self.transport.pause_reading()
        self._refusing = True
        self._timer = asyncio.get_running_loop().call_later(delay, self._refuse, why)

    def _refuse(self, why: str) -> None:
        self.fatal(ErrorCode.AUTH_FAILED, why, log_level=logging.DEBUG)

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
                self._auth_failed(given)
                return
        elif token is not None and (
            not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode())
        ):
            self._auth_failed(given)
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
                        self.broker.limits.max_frame_size, cfg.heartbeat)
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
                "conn %d %s: closing with %s still owed %.1f s after its BYE",
                self.conn_id, self.peer, many(owed, "reply", "replies"), self.config.shutdown_grace,
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
            # Which of the user's tokens: the start of its SHA-256, as in the users file (soft rotation).
            "token": self.user.token_hash.hex()[:8] if self.user is not None else None,
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
