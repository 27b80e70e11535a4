"""The async client: one TCP connection, many requests in flight.

    async with Client("tidings://127.0.0.1:6464", name="api") as c:
        offset = await c.publish("DB", "CREATE", {"id": 7})

The connection machinery (request matching, coalesced writes, the
publish fast path, reconnecting) is the base class,
:class:`client._transport.Transport`; this module is the API on top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

from protocol import (
    STATUS_SECTIONS,
    Ack,
    Batch,
    Bye,
    ConfigError,
    ConnectionClosed,
    Delete,
    ErrorCode,
    Fetch,
    Frame,
    Nack,
    Ping,
    Progress,
    Publish,
    Seek,
    ServerError,
    Status,
    StatusReply,
    Subscribe,
    TidingsError,
    Unsubscribe,
)

from ._transport import ACK_FLUSH, DEFAULT_URL, FLUSH_BYTES, Transport, _app_headers, parse_url
from .subscription import Message, Subscription

__all__ = ["DEFAULT_URL", "Client", "parse_url"]

logger = logging.getLogger(__name__)


def _start(start: str | int | datetime) -> tuple[str, int | None]:
    if isinstance(start, datetime):
        return "time", int(start.timestamp() * 1000)
    if isinstance(start, bool):
        raise ConfigError("start must be 'new', 'earliest', an offset or a datetime")
    if isinstance(start, int):
        if start < 0:
            raise ConfigError("a start offset cannot be negative")
        return "offset", start
    if start in ("new", "earliest"):
        return start, None
    raise ConfigError(f"start must be 'new', 'earliest', an offset or a datetime, not {start!r}")


def _ack_wait_ms(ack_wait: float | None) -> int:
    """``ack_wait`` (seconds) as the wire's milliseconds: 0 for the broker's
    default (None, 0), at least 1 for any positive wait (a wait under 1 ms
    rounded down to 0 asked for the 30 s default); negative as it is, for the
    frame's check to refuse."""
    if not ack_wait:
        return 0
    ms = round(ack_wait * 1000)
    return max(1, ms) if ack_wait > 0 else min(-1, ms)


def _events(events: str | Iterable[str]) -> tuple[str, ...]:
    """An ``events`` argument as the frame's tuple. A str is one name or
    pattern: it is an iterable too, of one-letter filters ("CREATE" filtered
    on C, R, E, A and T)."""
    return (events,) if isinstance(events, str) else tuple(events)


class Client(Transport):
    """A connection to a tidings broker.

    Its state, which ``repr()`` shows: *new* until :meth:`connect`; *open*
    (*reconnecting* while a lost connection is retried, see ``reconnect``);
    *closed* by :meth:`aclose` or :meth:`abort`, after which every call
    raises ConnectionClosed; or *broken*: the connection ended for good.
    That is a fatal error from the broker that reconnecting cannot help
    (AuthFailed, or a plain ServerError such as SLOW_CONSUMER or
    MALFORMED_FRAME), a connection lost with ``reconnect=False``
    (ConnectionLost, or ShuttingDown when the broker stops), reconnecting
    given up (ConnectionLost after ``reconnect_deadline``, or the broker's
    refusal of the new handshake, such as AuthFailed), or a handshake that
    failed in :meth:`connect`. A broken client does not reconnect: every
    call, :meth:`connect` included, raises that error (noted as having
    ended the connection), and its subscriptions end with it; :meth:`aclose`
    is harmless. Make a new Client to carry on.

    Args:
        url: ``tidings://host:port`` or ``tidingss://host:port`` (TLS), with
            nothing more: a token goes in ``token``, and a URL with a user,
            a token, a path or a query raises ConfigError.
        name: shown in the broker's STATUS (defaults to "python").
        token: credentials, when the broker requires a token (its
            ``TIDINGS_TOKEN``, or the token of one of the users of its users file).
        timeout: seconds to wait for connecting and for each reply.
        ssl_context: TLS settings for ``tidingss://`` (default: verify); with a
            ``tidings://`` URL it raises ConfigError (it would not be used: the
            URL was most likely meant to be ``tidingss://``).
        max_pending: buffered messages per ephemeral subscription before
            the client stops reading the socket.
        reconnect: when the connection is lost (or the broker restarts),
            reconnect with backoff, subscribe again and resend what was in
            flight; callers see an error only if the broker stays unreachable
            (or every connection drops again at once, before the broker
            answered anything on it) for ``reconnect_deadline`` seconds.
            Resent publishes are stored once: the client is a named producer
            (``producer_id``) whose request ids are its sequence numbers, and
            the broker confirms a resent one with the offset it already has.
            A request that was pending on three dropped connections fails
            with ``ConnectionLost`` instead of being resent again: the broker
            drops the connection for it (its third try is sent alone, so the
            requests resent with it are not blamed). This
            applies to publishes too: resending one is safe, but its caller
            would otherwise wait for as long as the broker keeps dropping it;
            a publish that failed so may still have been stored.
        reconnect_deadline: seconds to keep trying before giving up.
        reconnect_max_delay: the longest wait between two reconnect attempts,
            in seconds (the wait starts at 0.02 s and doubles). It starts over
            only once a connection has stayed up for a second, so connections
            that keep dropping right after coming back are retried about once
            per ``reconnect_max_delay``, not in a tight loop.

    Attributes:
        producer_id: random, unique to this client object; sent in HELLO.
    """

    __slots__ = ()  # see Reconnecting.__slots__

    def __repr__(self) -> str:
        if self._closed or self._closing:
            state = "closed" if self._closed else "closing"
        elif self._error is not None:
            state = f"broken ({type(self._error).__name__}: {self._error})"
        elif self._reconnecting:
            state = "reconnecting"
        else:
            state = "open" if self._sock is not None else "new"
        return (
            f"<Client {self.name!r} {self.host}:{self.port} {state} conn={self.conn_id} "
            f"pending={len(self._pending)} subs={len(self._subs)}>"
        )

    # --- connecting ---------------------------------------------------------

    @classmethod
    async def open(cls, url: str = DEFAULT_URL, **options: Any) -> Client:
        """Create a client and connect it.

        Raises:
            ConnectionLost: the broker cannot be reached.
            ServerError: the broker refused the handshake (e.g. AuthFailed),
                or the connection (TooManyConnections: at its limit; retriable).
        """
        client = cls(url, **options)
        await client.connect()
        return client

    async def connect(self) -> None:
        """Connect and shake hands.

        Nothing to do once connected (reconnecting included). A client
        connects once: closed, or broken (see the class docstring; a
        handshake that failed breaks it too), it raises instead.

        Raises:
            ConnectionLost: the broker cannot be reached.
            ServerError: the broker refused the handshake (e.g. AuthFailed),
                or the connection (TooManyConnections: at its limit; retriable).
            RequestTimeout: no WELCOME in time.
            ConnectionClosed: the client was closed (``aclose()``, ``abort()``).
            TidingsError: the client is broken: the error that broke it.
        """
        if self._closed or self._closing:
            raise ConnectionClosed("this client was closed: make a new Client to connect again")
        if self._error is not None or self._established:
            self._check_open()  # broken: raises why
            return
        self._loop = asyncio.get_running_loop()
        await self._open()
        self._established = True
        self._sweep()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- publishing ---------------------------------------------------------

    async def publish(
        self,
        queue: str,
        event: str,
        payload: Any = None,
        *,
        headers: dict[str, str] | None = None,
        message_id: str | None = None,
    ) -> int:
        """Publish one message and wait until the broker has stored it.

        Args:
            queue: the queue (created on first use).
            event: the event name.
            payload: any msgpack-serialisable value.
            headers: optional string headers.
            message_id: optional id; a repeat within the broker's dedup window
                is not stored again and returns the original offset.

        Returns:
            The message's offset in the queue.

        Raises:
            InvalidName: a queue or event name outside the rules.
            PayloadTooLarge: larger than the broker accepts.
            BadRequest: an empty ``message_id``, or one over 255 characters;
                or (code CONFLICT) the queue is being deleted.
            LocalProtocolError: found before sending, and nothing was sent:
                a bad name, message_id or headers, or a message over the
                frame limit (these are also InvalidName, BadRequest and
                PayloadTooLarge), or a payload that cannot be sent: one
                msgpack cannot encode, or with a map key other than a
                string or bytes (the broker's decoder takes no other).
            ServerError: other refusals by the broker: StorageFull
                (retriable), PermissionDenied, or a plain ServerError for
                STORAGE_FAILED and QUEUE_CORRUPT.
            RequestTimeout: no confirm within ``timeout``.
            ConnectionLost: the connection broke before the confirm arrived.
            ConnectionClosed: the client is closed, or not connected yet (a
                broken client raises the error that broke it: see Client).
        """
        # _request() inlined: two coroutines fewer per publish (the sweeper times it out).
        fut = self._send_publish(queue, event, payload, headers, message_id)
        if self._congested:
            await self._maybe_drain()
        return await fut  # the offset: _dispatch resolves a PUBLISH with it

    async def publish_ack(
        self,
        queue: str,
        event: str,
        payload: Any = None,
        *,
        headers: dict[str, str] | None = None,
        message_id: str | None = None,
    ) -> tuple[int, bool]:
        """Publish one message, as :meth:`publish`, and say whether it was a duplicate.

        A duplicate stored nothing: the broker had the message already (its
        ``message_id`` was seen within the dedup window), and the offset is
        the one stored first. After a reconnect, a publish resent because
        its confirm was lost can also be the duplicate of its own first
        try (stored once either way). :meth:`publish` is the same without
        the flag, and a little cheaper.

        Args:
            queue: the queue (created on first use).
            event: the event name.
            payload: any msgpack-serialisable value.
            headers: optional string headers.
            message_id: optional id for deduplication.

        Returns:
            ``(offset, duplicate)``.

        Raises:
            The same as :meth:`publish`.
        """
        fut = self._send_publish(queue, event, payload, headers, message_id)
        self._duplicates[fut] = False  # before any reply can come: replies are read in later loop turns
        try:
            if self._congested:
                await self._maybe_drain()
            offset: int = await fut
            return offset, self._duplicates[fut]
        finally:
            self._duplicates.pop(fut, None)

    async def publish_many(
        self, queue: str, messages: Iterable[tuple[str, Any] | tuple[str, Any, dict[str, str] | None]]
    ) -> list[int]:
        """Publish several messages in one write; wait for all their confirms.

        Every message is checked and encoded before any is sent: a
        LocalProtocolError means that nothing of the batch was sent.

        Args:
            queue: the queue.
            messages: ``(event, payload)`` or ``(event, payload, headers)`` tuples.

        Returns:
            Their offsets, in order.

        Raises:
            LocalProtocolError: found before sending, as for :meth:`publish`
                (a bad name, a message over the frame limit, a payload that
                cannot be sent); none of the messages was sent.
            ServerError: the first refusal, after all replies arrived (the
                others were stored).
            ConnectionLost: the connection broke before the confirms arrived.
        """
        futures = self._send_batch(queue, messages)
        await self._maybe_drain()
        # Await the futures themselves (the sweeper times them out): no task per message.
        offsets: list[int] = []
        error: BaseException | None = None
        for fut in futures:
            try:
                offsets.append(await fut)
            except TidingsError as exc:  # refused or lost: report the first, after all replies
                error = error or exc
        if error is not None:
            raise error
        return offsets

    def _send_batch(
        self, queue: str, messages: Iterable[tuple[str, Any] | tuple[str, Any, dict[str, str] | None]]
    ) -> list[asyncio.Future[int]]:
        """PUBLISH all of ``messages`` or none: :meth:`_send_publish` for each
        (the fast path where it applies), but all are encoded, and so checked,
        before any is registered or written (``_send_publish`` may write as
        it goes: FLUSH_BYTES)."""
        self._check_open()
        conn, reqs, reconnecting = self._conn, self._reqs, self._reconnecting
        encoded: list[tuple[int, Frame | bytes, bytes]] = []
        for m in messages:
            event, payload, headers = m[0], m[1], (m[2] if len(m) > 2 else None)
            req = next(reqs)
            try:
                fast = headers is None and queue in self._queue_names and event in self._event_names
            except TypeError:  # an unhashable name: Publish() words the error
                fast = False
            if fast and not reconnecting:
                data = conn.send_publish(req, queue, event, payload)
                encoded.append((req, data, data))
            else:
                frame = Publish(req, queue, event, payload, headers)
                encoded.append((req, frame, conn.encode(frame) if reconnecting else conn.send(frame)))
                self._remember_names(queue, event)
        # All passed: register and write them (nothing below raises). No _kinds
        # entry: a PUBLISH is timed by the sweeper as one.
        futures: list[asyncio.Future[int]] = []
        for req, resend, _ in encoded:  # (a resend is the fast path's bytes, or the frame)
            fut: asyncio.Future[int] = self._loop.create_future()
            self._pending[req] = fut
            if self.reconnect:
                self._frames[req] = resend
            futures.append(fut)
        if reconnecting:
            self._held.extend(req for req, _, _ in encoded)  # sent when the connection is back
            return futures
        if self._acks:  # acks queued earlier go first: the broker sees calls in program order
            self._write_acks()
        for _, _, data in encoded:
            self._wbuf.append(data)
            self._wbytes += len(data)
            if self._wbytes >= FLUSH_BYTES:
                self._write_buffered()
        self._schedule_flush()
        return futures

    # --- subscribing --------------------------------------------------------

    async def subscribe(
        self,
        queue: str,
        *,
        events: str | Iterable[str] = (),
        durable: str | None = None,
        start: str | int | datetime = "new",
        prefetch: int = 100,
        ack_wait: float | None = None,
        max_deliveries: int = 0,
        dead_letter: str | None = None,
    ) -> Subscription:
        """Start a push subscription.

        Args:
            queue: the queue to read.
            events: an event name or ``*`` pattern, or several (a list);
                empty = every event, but for a durable that exists already,
                which keeps its filter (pass ``"*"`` for every event).
            durable: a name to keep a cursor across disconnects; None =
                ephemeral (real-time, at-most-once, no acks).
            start: where a new durable (or an ephemeral subscription)
                begins: "new", "earliest", an offset or a datetime.
            prefetch: most unacked messages in flight to this subscription.
            ack_wait: seconds before an unacked message is redelivered
                (None or 0: the broker's default, 30 s; it is sent in whole
                milliseconds, at least 1; negative: BadRequest). Each redelivery of a
                message waits twice as long as the one before, up to 8x
                (``ack_wait``, then 2x, 4x, 8x, 8x...). For a durable that
                exists already, a value replaces its ack wait; None keeps it.
            max_deliveries: after this many deliveries without an ack, a
                message is moved to the dead-letter queue (0 = never).
            dead_letter: that queue (default ``<queue>.dead``).

        Returns:
            The subscription; iterate it, then ``await sub.close()``.

        Raises:
            ConfigError: a ``start`` that is none of those.
            InvalidName: a queue, durable or dead-letter name outside the rules.
            BadRequest: a value out of range (a prefetch of 0, a negative
                ack_wait...); or, with code CONFLICT, the durable is in use
                with another event filter, or the queue is being deleted.
                (InvalidName and BadRequest found before sending are also
                LocalProtocolError: nothing was sent.)
            PermissionDenied: the broker's users file does not allow it.
            ServerError: a plain one for QUEUE_CORRUPT and STORAGE_FAILED.
        """
        kind, value = _start(start)
        sub_id = next(self._subs_ids)
        patterns = _events(events)
        # Made (and so checked) first: one refused leaves no subscription behind.
        frame = Subscribe(
            0, sub_id, queue, patterns, durable, kind, value, prefetch,
            _ack_wait_ms(ack_wait), max_deliveries, dead_letter,
        )  # fmt: skip
        sub = Subscription(self, sub_id, queue, patterns, durable, prefetch, self.max_pending)
        sub._settings = (frame.ack_wait_ms, max_deliveries, dead_letter)
        self._subs[sub_id] = sub
        try:
            await self._request(frame)
        except BaseException:
            self._subs.pop(sub_id, None)
            raise
        if durable is not None:
            self._ack_every[(queue, durable)] = max(1, min(ACK_FLUSH, prefetch // 2))
        return sub

    async def _unsubscribe(self, sub: Subscription, offsets: tuple[int, ...] = ()) -> ServerError | None:
        """UNSUBSCRIBE after the acks queued, with an ACK of ``offsets`` in the
        same write (the broker refills nobody for acks it reads with the
        UNSUBSCRIBE); the refusal of that ACK, if any.

        Raises:
            ServerError, ConnectionLost: the UNSUBSCRIBE failed.
        """
        if not self._drop_sub(sub) or self._closed or self._error is not None:
            return None
        await self._flush_acks_now()
        acked = self._send_request(Ack(0, sub.queue, sub.durable, offsets)) if offsets and sub.durable else None
        error: BaseException | None = None
        try:
            await self._request(Unsubscribe(0, sub.sub_id))
        finally:
            if acked is not None:
                await asyncio.wait([acked])  # (answered before the UNSUBSCRIBE's OK, or failed with it)
                error = None if acked.cancelled() else acked.exception()
        return error if isinstance(error, ServerError) else None

    def _drop_sub(self, sub: Subscription) -> bool:
        """Forget ``sub`` (and its durable's ack batching, once no other
        subscription uses it); False if it was not known."""
        if self._subs.pop(sub.sub_id, None) is None:
            return False
        if sub.durable is not None:
            key = (sub.queue, sub.durable)
            if not any((s.queue, s.durable) == key for s in self._subs.values()):
                self._ack_every.pop(key, None)
        return True

    async def fetch(
        self,
        queue: str,
        *,
        durable: str | None = None,
        events: str | Iterable[str] = (),
        max_messages: int = 100,
        wait: float = 0.0,
        start: str | int | datetime = "earliest",
        ack_wait: float | None = None,
    ) -> list[Message]:
        """Pull messages (long poll).

        With ``durable`` the messages come from that durable's cursor and must
        be acked; without it this reads the log from ``start`` and remembers
        nothing.

        Args:
            queue: the queue.
            durable: the durable to pull for, or None for a plain read.
            events: an event name or ``*`` pattern, or several (a list), as
                for :meth:`subscribe`.
            max_messages: at most this many.
            wait: seconds to wait when nothing is available (0 = answer now).
            start: for a new durable or a plain read: "new", "earliest", an
                offset or a datetime.
            ack_wait: with ``durable``, as for :meth:`subscribe`: the wait
                before a message fetched and not acked is handed out again.

        Returns:
            Up to ``max_messages`` messages (empty if none arrived in time).

        Raises:
            As :meth:`subscribe` (CONFLICT: a durable in use with another
            event filter), and RequestTimeout: no answer within ``timeout``
            plus ``wait``.
        """
        kind, value = _start(start)
        frame = Fetch(
            0, queue, durable, _events(events), max_messages, int(wait * 1000), kind, value, _ack_wait_ms(ack_wait)
        )
        reply = await self._request(frame, timeout=self.timeout + wait)
        assert isinstance(reply, Batch)
        return [
            Message(
                queue, r.event, r.payload, _app_headers(r.headers), r.offset, r.timestamp, r.deliveries, durable, self
            )
            for r in reply.records
        ]

    # --- acks ---------------------------------------------------------------

    async def _ack(self, queue: str, durable: str, offset: int, *, wait: bool) -> None:
        if wait:
            await self._request(Ack(0, queue, durable, (offset,)))
            return
        self._check_open()
        key = (queue, durable)
        batch = self._acks.get(key)
        if batch is None:
            self._acks[key] = [offset]
            self._schedule_flush()
        else:
            batch.append(offset)
            if len(batch) >= self._ack_every.get(key, ACK_FLUSH) and not self._reconnecting:
                self._write_acks()  # the broker refills the window while we work on the rest
                self._write_buffered()

    async def ack_upto(self, queue: str, durable: str, offset: int) -> None:
        """Acknowledge every message of ``durable`` up to ``offset`` (cumulative).

        Raises:
            BadRequest: the broker refused, with code BAD_ACK (e.g. the
                offset was not delivered yet).
            NotFound: no such durable.
        """
        await self._flush_acks_now()
        await self._request(Ack(0, queue, durable, (), offset))

    async def _nack(self, queue: str, durable: str, offset: int, delay: float) -> None:
        await self._flush_acks_now()
        await self._request(Nack(0, queue, durable, (offset,), int(delay * 1000)))

    async def _progress(self, queue: str, durable: str, offset: int) -> None:
        await self._request(Progress(0, queue, durable, (offset,)))

    async def _flush_acks_now(self) -> None:
        if self._acks and not self._reconnecting:
            self._write_acks()

    # --- administration ---------------------------------------------------------

    async def delete_durable(self, queue: str, durable: str) -> None:
        """Delete a durable and its cursor.

        Raises:
            NotFound: no such durable.
            BadRequest: with code CONFLICT: it has consumers.
        """
        await self._request(Delete(0, queue, durable))

    async def seek(self, queue: str, durable: str, start: str | int | datetime) -> None:
        """Move a durable (rewind or skip ahead): it next delivers from ``start``
        ("earliest", "new", an offset or a datetime); what it had in flight is
        forgotten. Only while nobody is subscribed to it. An offset outside
        the log is taken to its nearest end; ``status()`` shows where the
        durable went (its ``ack_floor``).

        Raises:
            NotFound: no such durable.
            BadRequest: with code CONFLICT: it has consumers.
        """
        kind, value = _start(start)
        await self._request(Seek(0, queue, durable, kind, value))

    async def delete_queue(self, queue: str) -> None:
        """Delete a queue with all its messages and durables.

        Raises:
            NotFound: no such queue.
            BadRequest: with code CONFLICT: someone is reading it, or
                publishes to it are in flight (retry).
            ServerError: a plain one for STORAGE_FAILED (the files could
                not be removed).
        """
        await self._request(Delete(0, queue))

    # --- status and ping ----------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The broker's status: server, connections, queues, durables (see SPEC.md).

        A status too large for one frame comes in pages; they are fetched
        and joined here (``server`` is the first page's).
        """
        reply = await self._request(Status(0))
        assert isinstance(reply, StatusReply)
        info = reply.info
        more = info.pop("more", None)
        while more is not None:
            reply = await self._request(Status(0, more))
            assert isinstance(reply, StatusReply)
            page = reply.info
            if page.get("more") == more:  # no progress: a broker bug, not a reason to loop
                raise ServerError.for_code(ErrorCode.BAD_REQUEST, f"STATUS paging did not advance past {more!r}")
            more = page.pop("more", None)
            for section in STATUS_SECTIONS:
                info.setdefault(section, []).extend(page.get(section, ()))
        return info

    async def ping(self) -> float:
        """Round-trip time to the broker, in seconds."""
        t0 = time.perf_counter()
        await self._request(Ping(0))
        return time.perf_counter() - t0

    # --- closing ------------------------------------------------------------

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close gracefully: say BYE and wait for the answers to what was sent.

        Queued acks are written, then BYE. The broker answers every request
        sent before the BYE, then closes (SPEC section 3): requests made
        before this call complete as usual, so the ``publish()`` calls still
        waiting get their offsets once their records are on disk, and a
        ``fetch()`` still waiting gets its messages, or none, at once.
        Subscriptions get no more messages; those delivered but not acked
        go back to their durables, as on a disconnect.

        Requests made after this call raise ConnectionClosed. It falls back
        to :meth:`abort` when ``timeout`` seconds pass first, or the
        connection is down (reconnecting) when it is called, or the call is
        cancelled (the cancellation then goes on): what is still pending
        then fails with ConnectionClosed and may or may not have been
        carried out. Harmless twice.

        Args:
            timeout: seconds to wait for the broker's answers and its close.

        Raises:
            asyncio.CancelledError: cancelled while waiting (after the abort).
        """
        if self._closed or self._closing:
            return
        self._closing = True
        sock = self._sock
        try:
            if sock is not None and self._error is None and not self._reconnecting:
                try:
                    self._write_acks()
                    self._wbuf.append(self._conn.send(Bye(0)))
                    self._flush()
                    async with asyncio.timeout(timeout):
                        await sock.drain()
                        await asyncio.shield(sock.closed)  # the broker closes once it has answered all
                except (TimeoutError, OSError, ConnectionError):
                    pass
                except Exception as exc:  # a protocol state that forbids BYE: just drop it
                    logger.debug("close: %r", exc)
        finally:  # (cancelled too: abort, then let the cancellation go on)
            self.abort()
        if sock is not None:
            await asyncio.shield(sock.closed)

    def abort(self) -> None:
        """Drop the connection now; pending requests fail with ConnectionClosed."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._reconnect_task is not None and not self._reconnect_task.done():
            self._reconnect_task.cancel()
        sock = self._sock
        if sock is not None and sock.transport is not None:
            sock.finished = True  # closed by us: no reconnect, no warning
            sock.transport.abort()
        self._fail_all(ConnectionClosed(), clean=True)
