"""The client's connection half: one TCP connection, many requests in flight.

:class:`Transport` is the base of :class:`client.Client`, which adds the
API (publish, subscribe, fetch, acks, administration) on top of it.

* The socket's bytes go straight from the event loop's read callback
  (:class:`client._socket._Socket`, an ``asyncio.Protocol``) to the sans-I/O
  :class:`protocol.Connection`; replies are matched to requests by id (a
  dict of futures), so many publishes can be in flight at once. One timer
  (``_sweep``) times every request out; what it needs is kept per write, not
  per request (see ``_mark``).
* Writes are coalesced: frames produced during one event-loop turn leave in
  one ``write()``. ``publish`` awaits the socket only when the write buffer is
  over its high-water mark, then waits for its PUBACK. A publish to names
  already checked, without headers, packs its wire list directly.
* When the connection breaks, the client reconnects and resends what was
  in flight (:mod:`client._reconnect`, the base class :class:`Reconnecting`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import ssl
import uuid
from typing import TYPE_CHECKING, Any, Final, cast

from protocol import (
    PRODUCER_HEADER,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ConfigError,
    Connection,
    ConnectionClosed,
    ConnectionLost,
    Deliver,
    Err,
    ErrorCode,
    Frame,
    FrameType,
    Hello,
    Limits,
    Ping,
    Pong,
    PubAck,
    PubAckRun,
    Publish,
    RemoteProtocolError,
    RequestTimeout,
    Role,
    ServerError,
    State,
    Welcome,
)
from protocol.errors import FATAL_CODES
from protocol.messages import MAX_MESSAGE_ID_LENGTH

from ._address import DEFAULT_URL, ClientCert, connect_failed, parse_url, refused_handshake_hint, tls_hint
from ._reconnect import BACKOFF_MAX, Reconnecting
from ._socket import _Socket
from .subscription import Message, Subscription

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ACK_FLUSH", "DEFAULT_MAX_PENDING", "DEFAULT_URL", "Transport", "connect_failed", "parse_url", "tls_hint"]

logger = logging.getLogger(__name__)

#: Write buffer high-water mark: publish() awaits drain above it.
WRITE_HIGH_WATER: Final = 1024 * 1024
#: PUBLISH bytes buffered in one loop turn that are written at once, not at
#: the end of the turn. With many publishes in flight their confirms come
#: back together and the next publishes are all made in one turn: written as
#: one block, the broker would wait for the whole block while the client
#: makes it, then the client for the broker (lockstep). In 32 KiB pieces the
#: two overlap: window 1,000 went from 131k to 182k msg/s here (medians of 6
#: interleaved pairs).
FLUSH_BYTES: Final = 32 * 1024
#: Acks of one durable queued in one loop turn that are written at once, not
#: at the end of the turn (half the subscription's prefetch when that is
#: less). A subscriber that works through a whole prefetch window in one turn
#: would otherwise return the credit only when it is done, and the broker,
#: out of credit, would wait for it (lockstep again): catch-up with prefetch
#: 1,000 went from 54-86k to 87-157k msg/s, with prefetch 100 (acks every
#: 50) from 57-65k to 90-101k.
ACK_FLUSH: Final = 128
#: Ephemeral subscriptions stop the socket reader past this many buffered messages.
DEFAULT_MAX_PENDING: Final = 10_000
#: Queue (and event) names remembered as valid per client; the set starts
#: over past this, so a client publishing to ever new names keeps it bounded.
NAME_CACHE_SIZE: Final = 4096
_PUBLISH_TYPE: Final = FrameType.PUBLISH
_MAX_ID: Final = MAX_MESSAGE_ID_LENGTH
#: A PubAckRun yields each PUBACK's duplicate flag as its msgpack byte: this is true.
_MSGPACK_TRUE: Final = 0xC3


class Transport(Reconnecting):
    """The connection machinery of a :class:`client.Client` (see the module
    docstring); its arguments are the client's."""

    # The client's state but the reconnect half's (why slots: see Reconnecting.__slots__).
    __slots__ = (
        "_ack_every", "_ack_reqs", "_acks", "_client_cert", "_closed", "_closing", "_congested", "_conn", "_duplicates",
        "_error", "_event_names", "_flush_scheduled", "_heard", "_heartbeat", "_kinds", "_loop", "_mark_step",
        "_mark_until", "_marked", "_marks", "_pending", "_queue_names", "_reading_paused", "_reqs", "_sock", "_ssl",
        "_subs", "_subs_ids", "_sweeper", "_token", "_wbuf", "_wbytes", "conn_id", "host", "max_pending", "name",
        "port", "producer_id", "server_version", "timeout", "url",
    )  # fmt: skip
    _loop: asyncio.AbstractEventLoop  # set by Client.connect()

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        name: str = "python",
        token: str | None = None,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        reconnect: bool = True,
        reconnect_deadline: float = 60.0,
        reconnect_max_delay: float = BACKOFF_MAX,
    ) -> None:
        if not reconnect_max_delay > 0:
            raise ConfigError(f"reconnect_max_delay must be a positive number of seconds, not {reconnect_max_delay!r}")
        self.url = url
        self.host, self.port, tls = parse_url(url)
        if ssl_context is not None and not tls:
            raise ConfigError(f"ssl_context is for TLS, but {url} is plain TCP: use tidingss://{self.host}:{self.port}")
        self.name = name
        self.timeout = timeout
        self.max_pending = max_pending
        self._token = token
        self._ssl = (ssl_context or ssl.create_default_context()) if tls else None
        #: What the hints of a refused handshake take the client to present: none in our
        #: default context; not known in the caller's (``tidings`` sets its --tls-cert here).
        self._client_cert: ClientCert = False if ssl_context is None else None
        self.server_version = ""
        self.conn_id = 0
        self._conn = Connection(Role.CLIENT, limits=Limits(), puback_runs=True)
        self._sock: _Socket | None = None
        self._reqs = itertools.count(1)
        self._subs_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}  # PUBLISH: the offset, else the reply
        #: The PUBLISH futures of publish_ack() callers: whether the PUBACK said duplicate.
        #: (A PUBLISH future resolves to the bare offset; only these few also learn the flag.)
        self._duplicates: dict[asyncio.Future[Any], bool] = {}
        #: (deadline, req): every request up to req was written by deadline - timeout (see _mark).
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._marked = 0  # the last req a mark covers
        self._mark_step = timeout / 16  # how much later than its first write's a mark's deadline is
        #: The newest mark's deadline (``_marks[-1][0]`` while there is a mark; a
        #: cleared deque is caught by its emptiness, so clearing needs no reset).
        self._mark_until = 0.0
        #: Pending requests other than fast-path PUBLISHes: their type (for the
        #: timeout's message), or None when the caller applies its own timeout.
        self._kinds: dict[int, FrameType | None] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        #: The broker's heartbeat (WELCOME), and when the sweeper last saw the
        #: socket's read count move: a broker silent for 3 intervals is dead
        #: (a live one PINGs an idle client every 2), see _sweep.
        self._heartbeat = 0.0
        self._heard: tuple[int, float] = (0, 0.0)
        self._subs: dict[int, Subscription] = {}
        self._wbuf: list[bytes] = []
        self._wbytes = 0  # PUBLISH bytes in _wbuf
        self._flush_scheduled = False
        self._congested = False  # the transport's buffer passed WRITE_HIGH_WATER at the last flush
        self._acks: dict[tuple[str, str], list[int]] = {}
        #: Per durable: queued acks written at once within a turn (ACK_FLUSH,
        #: or half the prefetch of its subscription when that is less).
        self._ack_every: dict[tuple[str, str], int] = {}
        self._ack_reqs: dict[int, tuple[str, str]] = {}  # fire-and-forget ACK frames awaiting OK/ERR
        self._reading_paused = False
        self._error: BaseException | None = None
        self._closing = False
        self._closed = False
        self.reconnect = reconnect
        self.reconnect_deadline = reconnect_deadline
        self.reconnect_max_delay = reconnect_max_delay
        #: How often the connection was re-established.
        self.reconnects = 0
        # Pending requests, resent after a reconnect (a fast-path PUBLISH as its bytes).
        self._frames: dict[int, Frame | bytes] = {}
        self._reconnecting = False
        self._established = False
        self._held: list[int] = []  # requests made while reconnecting
        self._reconnect_task: asyncio.Task[None] | None = None
        #: req -> how many connections dropped while it was pending (MAX_DROPS);
        #: rebuilt at each drop from the requests still pending then.
        self._drops: dict[int, int] = {}
        self._backoff = 0.0  # the wait before the next reconnect attempt
        #: When this outage's reconnect_deadline runs out; None while the connection is healthy.
        self._outage_deadline: float | None = None
        self._healthy_timer: asyncio.TimerHandle | None = None  # HEALTHY_AFTER after a reconnect
        self.producer_id = uuid.uuid4().hex[:16]
        # Names that passed Publish's checks: later publishes skip them (_send_publish).
        self._queue_names: set[str] = set()
        self._event_names: set[str] = set()

    async def _open(self) -> None:
        """Open a fresh socket and shake hands (also used to reconnect).

        The HELLO's future is pending before the socket opens: a broker at its
        connection limit answers ERR TOO_MANY_CONNECTIONS as soon as it accepts
        (SPEC 3, item 2), and the event loop may hand us that ERR before
        ``create_connection`` returns (uvloop does). The ERR then fails the
        future, and the HELLO is not sent on the dead socket.
        """
        self._conn = Connection(Role.CLIENT, limits=Limits(), puback_runs=True)
        credentials = {"token": self._token} if self._token is not None else None
        hello = Hello(next(self._reqs), PROTOCOL_VERSION, self.name, credentials, self.producer_id)
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self._pending[hello.req] = fut
        self._kinds[hello.req] = None  # timed by _wait below
        try:
            async with asyncio.timeout(self.timeout):
                _, sock = await self._loop.create_connection(lambda: _Socket(self), self.host, self.port, ssl=self._ssl)
        except TimeoutError:
            self._forget(hello.req)
            raise RequestTimeout(f"connecting to {self.host}:{self.port}", self.timeout) from None
        except OSError as exc:
            self._forget(hello.req)
            raise connect_failed(self.host, self.port, exc, self._ssl, self._client_cert) from exc
        except BaseException:
            self._forget(hello.req)
            raise
        assert sock.transport is not None
        sock.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._sock = sock
        self._reading_paused = False
        if not sock.finished:  # (finished: the broker's ERR came first and failed ``fut``)
            sock.write(self._conn.send(hello))
        try:
            welcome = await self._wait(fut, "hello", self.timeout)
        except BaseException:
            self._forget(hello.req)
            sock.transport.abort()
            raise
        assert isinstance(welcome, Welcome)
        self._conn.adopt_max_frame_size(welcome.max_frame_size)
        self._heartbeat = welcome.heartbeat
        self._heard = (sock.reads, self._loop.time())
        self.server_version = welcome.server
        self.conn_id = welcome.conn_id

    # --- requests and writes ------------------------------------------

    def _check_open(self) -> None:
        """Raise what a call on this client raises now, if it cannot be made.

        Closed by us (``aclose()``, ``abort()``): ConnectionClosed. Broken
        (the connection ended for good, see ``Client``): the error that
        ended it. Never connected: ConnectionClosed, saying so.
        """
        if self._closed or self._closing:
            raise ConnectionClosed()
        if self._error is not None:
            raise self._error.with_traceback(None)  # (not one traceback longer per call)
        if self._sock is None:
            raise ConnectionClosed("not connected: call connect() or use async with")

    def _send_request(self, frame: Frame, *, tracked: bool = True) -> asyncio.Future[Frame]:
        self._check_open()
        req = next(self._reqs)
        object.__setattr__(frame, "req", req)  # frames are values; the id is ours to assign
        # Encoded before anything is registered: a frame that cannot be sent
        # (an unencodable payload) raises here and leaves nothing pending.
        # While reconnecting it is only checked; the new connection sends it.
        data = self._conn.encode(frame) if self._reconnecting else self._conn.send(frame)
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self._pending[req] = fut
        self._kinds[req] = frame.TYPE if tracked else None  # None: the caller applies its own timeout
        if self.reconnect:
            self._frames[req] = frame
        if self._reconnecting:
            self._held.append(req)  # sent when the connection is back (after the acks)
        else:
            if self._acks:  # acks queued earlier go first: the broker sees calls in program order
                self._write_acks()
            self._wbuf.append(data)
            self._schedule_flush()
        return fut

    def _send_publish(
        self, queue: str, event: str, payload: Any, headers: dict[str, str] | None, message_id: str | None
    ) -> asyncio.Future[int]:
        """Send one PUBLISH: :meth:`_send_request` for the common case, at about half its cost.

        The future resolves to the message's offset (see :meth:`_dispatch`).

        Names are checked once per client through :class:`Publish` (which
        words the errors) and remembered; after that, a publish without
        headers packs its wire list directly (``Connection.send_publish``)
        and skips the frame's validation. For a reconnect, ``_frames`` keeps
        the encoded frame itself: a resend is the identical frame, same
        ``req`` (``Connection.send_again`` checks it against the new
        connection's limit).
        """
        try:
            fast = headers is None and queue in self._queue_names and event in self._event_names
        except TypeError:  # an unhashable name: Publish() below words the error
            fast = False
        if (
            not fast
            or self._reconnecting
            or (message_id is not None and (type(message_id) is not str or not 0 < len(message_id) <= _MAX_ID))
        ):
            general = self._send_request(Publish(0, queue, event, payload, headers, message_id))
            self._remember_names(queue, event)  # valid: Publish() raised otherwise
            return cast("asyncio.Future[int]", general)
        if self._error is not None or self._closed or self._closing or self._sock is None:
            self._check_open()  # raises
        req = next(self._reqs)
        data = self._conn.send_publish(req, queue, event, payload, message_id)
        loop = self._loop
        fut: asyncio.Future[int] = loop.create_future()
        self._pending[req] = fut  # no _kinds entry: a PUBLISH, timed by the sweeper
        if self.reconnect:
            self._frames[req] = data
        if self._acks:  # acks queued earlier go first: the broker sees calls in program order
            self._write_acks()
        self._wbuf.append(data)
        self._wbytes += len(data)
        if self._wbytes >= FLUSH_BYTES:
            self._write_buffered()  # the broker can start on these while we make the rest
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _remember_names(self, queue: str, event: str) -> None:
        """Note a queue and an event name that passed ``Publish``'s checks."""
        for names, name in ((self._queue_names, queue), (self._event_names, event)):
            if name not in names:
                if len(names) >= NAME_CACHE_SIZE:
                    names.clear()
                names.add(name)

    def _write_acks(self) -> None:
        """One ACK frame per durable for the acks queued this turn.

        Each has its own req so that a refusal (ERR) names the durable it is
        for (it goes to those subscriptions' ``ack_errors``); nobody awaits
        the OK.
        """
        acks, self._acks = self._acks, {}
        for key, offsets in acks.items():
            req = next(self._reqs)
            self._ack_reqs[req] = key
            self._wbuf.append(self._conn.send(Ack(req, key[0], key[1], tuple(offsets))))

    def _mark(self) -> None:
        """Note that every request made so far is written (or held) by now.

        Requests share one timeout and get increasing reqs, and ``_pending``
        keeps them in that order, so one mark ``(deadline, last req)`` times
        out every request up to that req: the sweeper needs no entry per
        request (a deque of one per publish was 1.8k of the client's ~31k
        instructions per publish, and held ~130 bytes per publish for
        ``timeout`` seconds: 67 MB after 500,000 publishes with a 60 s
        timeout). Nor one per write: a mark's deadline is a sixteenth of the
        timeout later than its first write's, and the writes until then share
        it (one mark per write held ~70,000 marks, 8 MB, for a client writing
        5,000 times a second with the 10 s timeout). A request times out at
        most a sixteenth late, less than the sweeper's own period (a quarter).
        """
        if self._pending:
            last = next(reversed(self._pending))
            if last > self._marked:
                self._marked = last
                deadline = self._loop.time() + self.timeout
                marks = self._marks
                if deadline <= self._mark_until and marks:  # within the last mark's step: it covers this write too
                    marks[-1] = (self._mark_until, last)
                else:
                    self._mark_until = until = deadline + self._mark_step
                    marks.append((until, last))

    def _unmark(self) -> None:
        """Forget the marks: the next write gives what is pending a whole timeout from then."""
        self._marks.clear()
        self._marked = 0

    def _sweep(self) -> None:
        """Fail requests older than ``timeout`` (one timer for all of them).

        A per-request ``asyncio.timeout`` costs a timer handle per publish;
        each expired mark (see :meth:`_mark`) fails the pending requests up
        to its req instead, but those whose caller times them itself.

        It also watches the broker's side: a live broker sends something at
        least every two heartbeat intervals (it PINGs a client it has not
        heard from for one), so nothing read for three means a dead broker
        or a half-open connection (a host gone without a FIN), which no
        write would reveal to an idle subscriber: the connection is dropped
        as lost (then reconnected, if the client does).

        While the client has paused reading (an ephemeral subscription's
        messages wait unread past ``max_pending``) the broker's frames wait
        unheard in the socket, so that is no silence; and the broker, whose
        PINGs go unanswered meanwhile, is sent one PING per sweep (at least
        two per heartbeat interval) to know the client is alive.
        """
        now = self._loop.time()
        sock = self._sock
        if self._heartbeat > 0 and sock is not None and not sock.finished and self._conn.state is State.READY:
            reads, since = self._heard
            if self._reading_paused:
                self._heard = (sock.reads, now)
                self._wbuf.append(self._conn.send(Ping(0)))
                self._schedule_flush()
            elif sock.reads != reads:
                self._heard = (sock.reads, now)
            elif now - since > 3 * self._heartbeat:
                self._finish(sock, ConnectionLost(
                    f"nothing from the broker at {self.host}:{self.port} for {now - since:.1f} s"
                    f" (3 heartbeat intervals of {self._heartbeat:g} s): the connection is dead"
                ))  # fmt: skip
        marks, pending, kinds = self._marks, self._pending, self._kinds
        while marks and marks[0][0] <= now and not self._reconnecting:
            _, last = marks.popleft()
            for req in list(itertools.takewhile(last.__ge__, pending)):  # oldest first
                kind = kinds.get(req, _PUBLISH_TYPE)
                if kind is None:
                    continue  # its caller's own timeout applies
                fut = self._forget(req)
                if fut is not None and not fut.done():
                    fut.set_exception(RequestTimeout(kind.name.lower(), self.timeout))
        if not self._closed and self._error is None:
            period = min(self.timeout / 4, self._heartbeat / 2) if self._heartbeat > 0 else self.timeout / 4
            self._sweeper = self._loop.call_later(max(period, 0.01), self._sweep)

    def _forget(self, req: int) -> asyncio.Future[Any] | None:
        """Drop a request from the books (answered, failed or timed out); its future, if it was pending."""
        self._kinds.pop(req, None)
        self._frames.pop(req, None)
        return self._pending.pop(req, None)

    async def _request(self, frame: Frame, timeout: float | None = None) -> Frame:
        fut = self._send_request(frame, tracked=timeout is None)
        await self._maybe_drain()
        try:
            return await self._wait(fut, frame.TYPE.name.lower(), timeout)
        except RequestTimeout:
            self._forget(frame.req)  # type: ignore[attr-defined]  # given up: a late answer finds nothing
            raise

    async def _wait(self, fut: asyncio.Future[Frame], what: str, timeout: float | None = None) -> Frame:
        if timeout is None:
            return await fut  # the sweeper enforces self.timeout
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise RequestTimeout(what, timeout) from None

    async def _maybe_drain(self) -> None:
        sock = self._sock
        if (
            sock is not None
            and sock.transport is not None
            and sock.transport.get_write_buffer_size() > WRITE_HIGH_WATER
        ):
            try:
                await sock.drain()
            except (OSError, ConnectionError) as exc:
                raise ConnectionLost(str(exc)) from exc
            self._congested = sock.transport.get_write_buffer_size() > WRITE_HIGH_WATER
        else:
            self._congested = False

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._reconnecting:
            self._mark()  # held, but made: their timeout runs (_write_buffered marks the others)
            return  # acks and requests wait for the new connection
        if self._acks:
            self._write_acks()
        self._write_buffered()

    def _write_buffered(self) -> None:
        sock = self._sock
        if self._wbuf and sock is not None and sock.transport is not None and not sock.transport.is_closing():
            data = b"".join(self._wbuf)
            self._wbuf.clear()
            self._wbytes = 0
            self._mark()
            sock.write(data)
            # Only a flush fills the transport's buffer: publish() checks this flag, not the buffer.
            self._congested = sock.transport.get_write_buffer_size() > WRITE_HIGH_WATER

    def _discard_unsent(self) -> None:
        """Drop what was buffered but not written (after a drop: encoded for a connection that is gone)."""
        self._wbuf.clear()
        self._wbytes = 0

    def _maybe_resume_reading(self) -> None:
        if self._reading_paused and all(s.pending <= s.max_pending // 2 for s in self._subs.values()):
            self._reading_paused = False
            sock = self._sock
            if sock is not None and sock.transport is not None and not sock.finished:
                sock.transport.resume_reading()

    # --- reading ------------------------------------------------------

    def _received(self, sock: _Socket, data: bytes) -> None:
        """The socket's bytes (:meth:`_Socket.data_received`): decode, dispatch every frame."""
        if sock.finished:
            return  # a connection given up on (a protocol error earlier in this read)
        conn = self._conn
        conn.receive_data(data)
        error: BaseException | None = None
        try:
            events = conn.events()
        except RemoteProtocolError as exc:
            events, error = exc.before, exc  # what came before the bad bytes still counts
        try:
            for event in events:
                failed = self._dispatch(event)
                if failed is not None:
                    error = failed
                    break
        except RemoteProtocolError as exc:
            error = exc
        if error is not None:
            self._finish(sock, error)
        elif self._reading_paused and sock.transport is not None:
            sock.transport.pause_reading()  # resumed by _maybe_resume_reading

    def _lost(self, sock: _Socket, exc: Exception | None) -> None:
        """The socket closed (:meth:`_Socket.connection_lost`)."""
        if sock.finished:
            return
        error: BaseException | None = None
        if exc is not None:
            before_welcome = self._conn.state is not State.READY
            hint = tls_hint(exc, self._ssl, self._client_cert) if isinstance(exc, OSError) and before_welcome else ""
            error = ConnectionLost(f"connection to {self.host}:{self.port} lost: {exc}{hint}")
            error.__cause__ = exc
        elif not self._closing:
            error = ConnectionLost(f"the broker at {self.host}:{self.port} closed the connection")
            if self._conn.state is not State.READY:
                hint = (
                    "if the broker serves TLS there, use tidingss://"
                    if self._ssl is None
                    else refused_handshake_hint(self._client_cert)
                )
                error = ConnectionLost(f"{self.host}:{self.port} closed the connection before answering HELLO ({hint})")
        self._finish(sock, error)

    def _finish(self, sock: _Socket, error: BaseException | None) -> None:
        """Done with ``sock`` (once): reconnect, or fail what is pending; None: a clean close."""
        sock.finished = True
        if error is not None and not self._closing:
            logger.warning("%s: %s", self.url, error)
        if sock.transport is not None:
            sock.transport.abort()
        if error is not None and self._may_reconnect(error):
            self._start_reconnect(error, answered=sock.reads > 1)  # more than the WELCOME came
        elif self._reconnecting:
            # A reconnect attempt failed during its handshake: fail only that.
            for req in [r for r in self._pending if r not in self._frames]:
                self._fail(req, error or ConnectionLost("connection closed during the handshake"))
        else:
            self._fail_all(error or ConnectionClosed(), clean=error is None)

    def _dispatch(self, event: object) -> BaseException | None:
        t = type(event)
        if t is PubAckRun:  # a publisher's usual read: resolve each PUBLISH with its offset
            pending, frames, kinds = self._pending, self._frames, self._kinds
            for acked, offset, duplicate in event:  # type: ignore[attr-defined]
                fut = pending.pop(acked, None)
                if fut is not None:
                    if frames:
                        frames.pop(acked, None)
                    if kinds:  # a PUBLISH that took the general path
                        kinds.pop(acked, None)
                    if not fut.done():
                        if duplicate == _MSGPACK_TRUE and fut in self._duplicates:  # (rare: see publish_ack)
                            self._duplicates[fut] = True
                        fut.set_result(offset)
            return None
        if t is Deliver:
            ev: Deliver = event  # type: ignore[assignment]
            sub = self._subs.get(ev.sub_id)
            if sub is not None:
                sub._last_offset = ev.offset
                sub._deliver(
                    Message(sub.queue, ev.event, ev.payload, _app_headers(ev.headers), ev.offset,
                            ev.timestamp, ev.deliveries, sub.durable, cast("Client", self))
                )  # fmt: skip
                if sub.durable is None and sub.pending > sub.max_pending:
                    self._reading_paused = True
            return None
        if t is Ping:
            self._wbuf.append(self._conn.send(Pong(event.req)))  # type: ignore[attr-defined]
            self._schedule_flush()
            return None
        if t is Bye:
            return None
        req: int = event.req  # type: ignore[attr-defined]
        if t is Err:
            err: Err = event  # type: ignore[assignment]
            exc = ServerError.for_code(err.code, err.message)
            if req == 0:
                if err.code in FATAL_CODES or err.code == ErrorCode.SHUTTING_DOWN:
                    return exc
                logger.warning("%s: %s", self.url, exc)
                return None
            acked = self._ack_reqs.pop(req, None)
            if acked is not None:  # a fire-and-forget ack was refused (in part)
                logger.warning("%s: ack of %s/%s: %s", self.url, acked[0], acked[1], exc)
                for sub in self._subs.values():
                    if (sub.queue, sub.durable) == acked:
                        sub.ack_errors.append(exc)
                return None
            fut = self._forget(req)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return exc if err.code in FATAL_CODES else None
        fut = self._forget(req)
        if fut is None:
            self._ack_reqs.pop(req, None)
        if fut is not None and not fut.done():
            if t is PubAck and event.duplicate and fut in self._duplicates:  # type: ignore[attr-defined]
                self._duplicates[fut] = True
            fut.set_result(event.offset if t is PubAck else event)  # type: ignore[attr-defined]
        return None

    def _fail_all(self, error: BaseException, *, clean: bool) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._healthy_timer is not None:
            self._healthy_timer.cancel()
            self._healthy_timer = None
        self._drops.clear()
        self._marks.clear()
        self._kinds.clear()
        if self._error is None and not clean:
            self._error = error
            if self._established:  # (a failed connect() may be tried again)
                error.add_note(
                    f"The connection to {self.host}:{self.port} ended with this error, for good: "
                    "every call on this client raises it (make a new Client)."
                )
        pending, self._pending = self._pending, {}
        self._frames.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error if not clean else ConnectionClosed())
                fut.exception()  # mark retrieved: the caller may have gone
        for sub in list(self._subs.values()):
            sub._end(None if clean else error)
        if clean:
            self._closed = True


def _app_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """A message's headers without the broker's bookkeeping (``x-producer-seq``).

    The dict is the one just decoded from the frame, so it is changed in place.
    """
    if not headers:
        return {}
    headers.pop(PRODUCER_HEADER, None)
    return headers
