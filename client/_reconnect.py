"""The client's reconnecting half: backoff, resends, and requests that keep failing.

When the connection breaks, the client reconnects with backoff and resends
what was in flight (``reconnect=True``, the default): acks and requests
made meanwhile first, then every pending request with its original
``req`` (for a PUBLISH its producer sequence number, so the broker stores
it once), then the subscriptions. Without reconnecting, or past
``reconnect_deadline``, every pending request fails with ``ConnectionLost``
(chained to the cause) and every subscription ends with it.

A reconnect ends the outage only once the new connection has stayed up
for ``HEALTHY_AFTER``: one that drops again at once (a flapping network,
or a broker that drops it for a resent request) keeps the backoff growing
(0.02 s doubling up to ``reconnect_max_delay``) and the deadline running,
unless the broker answered something on it. A request pending on
``MAX_DROPS`` dropped connections fails alone with ``ConnectionLost``
(a "poison" request the broker drops the connection for, PUBLISH
included); on its last chance it is resent alone (``_probe``), so the
requests resent with it do not share its fate. Drops are counted when
they happen, over what is pending: the publish path pays nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from protocol import (
    Connection,
    ConnectionLost,
    ErrorCode,
    Frame,
    FrameType,
    LocalProtocolError,
    RequestTimeout,
    ServerError,
    Subscribe,
)

if TYPE_CHECKING:
    from ._socket import _Socket
    from .subscription import Subscription

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "HEALTHY_AFTER", "MAX_DROPS", "RECONNECT_CODES", "Reconnecting"]

logger = logging.getLogger("client._transport")  # one logger for the connection machinery

#: Reconnect backoff: the first attempt after a healthy connection drops is
#: immediate, each further one waits twice as long as the last, from
#: BACKOFF_MIN up to ``reconnect_max_delay`` (default BACKOFF_MAX: a
#: restarting broker is back within a few attempts; one that stays away, or
#: keeps dropping the connection, costs about one attempt a second).
BACKOFF_MIN: Final = 0.02
BACKOFF_MAX: Final = 1.0
#: A connection that stayed up this long is healthy: the backoff starts over
#: and the next outage gets a whole ``reconnect_deadline``. Until then a
#: reconnect does not end the outage, so a connection that is dropped again
#: right away (a broker that drops it for a resent request, or a network that
#: flaps) keeps the delay growing, and the deadline running unless the broker
#: answered something on it (then it was usable, and the client does not
#: give up on it). Time up, not an answer, resets the backoff: it needs no
#: traffic (an idle client has none), and an answer proves little when the
#: broker drops the connection for the next request, or for a message it
#: delivers after answering the SUBSCRIBE: reset by answers, such a loop would
#: reconnect as fast as the broker answers. One second: with the default
#: BACKOFF_MAX the client then reconnects about once a second at most,
#: whatever the pattern.
HEALTHY_AFTER: Final = 1.0
#: A request pending on this many dropped connections fails with
#: ConnectionLost instead of being resent again: a request the broker drops
#: the connection for (a "poison" request) would otherwise be resent for as
#: long as the broker is reachable. Three: a request outlives one drop
#: (a broker restart) or two (a restart within a restart) as before. On its
#: last chance it is resent alone (see ``_probe``), so that the requests
#: resent with it do not share its fate.
MAX_DROPS: Final = 3
#: Connection-ending errors after which reconnecting makes sense.
RECONNECT_CODES: Final = frozenset(
    {
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.HEARTBEAT_TIMEOUT,
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.PERMISSIONS_CHANGED,  # resubscribing ends what is no longer allowed
    }
)


class Reconnecting:
    """Base of :class:`client._transport.Transport`: what happens after a drop.

    Its state is made in ``Transport.__init__``; the names below are what
    this half reads and writes. Its slots are those of its own state (the
    reconnect settings and bookkeeping); Transport declares the rest.
    """

    # The client's classes have slots, not an instance dict: CPython 3.11
    # keeps an object's attributes in its fast inline layout only while its
    # class has fewer than 30 of them, and a client has 53: they all went to
    # a dict, which every attribute access paid for. With slots,
    # bench.instructions counts 29,235 -> 28,472 instructions per publish at
    # window 1,000 (-2.6%) and 62,949 -> 60,644 at window 1 (-3.7%). Slots
    # rather than the rarely used state grouped into helper objects: about
    # 30 attributes are on the hot paths, and a dozen of the cold ones are
    # public. An attribute missing from the slots fails at its assignment
    # (and in mypy); a subclass's own attributes go to a dict; a client can
    # still be weakly referenced (``__weakref__``), as before.
    __slots__ = (
        "__weakref__", "_backoff", "_drops", "_established", "_frames", "_healthy_timer", "_held", "_outage_deadline",
        "_reconnect_task", "_reconnecting", "reconnect", "reconnect_deadline", "reconnect_max_delay", "reconnects",
    )  # fmt: skip

    url: str
    host: str
    port: int
    conn_id: int
    reconnect: bool
    reconnect_deadline: float
    reconnect_max_delay: float
    reconnects: int
    _loop: asyncio.AbstractEventLoop
    _conn: Connection
    _sock: _Socket | None
    _closing: bool
    _closed: bool
    _established: bool
    _reconnecting: bool
    _reconnect_task: asyncio.Task[None] | None
    _pending: dict[int, asyncio.Future[Any]]
    _frames: dict[int, Frame | bytes]
    _held: list[int]
    _drops: dict[int, int]
    _backoff: float
    _outage_deadline: float | None
    _healthy_timer: asyncio.TimerHandle | None
    _wbuf: list[bytes]
    _acks: dict[tuple[str, str], list[int]]
    _ack_reqs: dict[int, tuple[str, str]]
    _subs: dict[int, Subscription]

    if TYPE_CHECKING:  # Transport's

        async def _open(self) -> None: ...
        def _forget(self, req: int) -> asyncio.Future[Any] | None: ...
        def _fail_all(self, error: BaseException, *, clean: bool) -> None: ...
        def _write_acks(self) -> None: ...
        def _send_request(self, frame: Frame, *, tracked: bool = True) -> asyncio.Future[Frame]: ...
        def _flush(self) -> None: ...
        def _discard_unsent(self) -> None: ...
        def _unmark(self) -> None: ...

    def _may_reconnect(self, error: BaseException) -> bool:
        if not self.reconnect or self._closing or self._closed or self._reconnecting or not self._established:
            return False
        if isinstance(error, ConnectionLost):
            return True
        return isinstance(error, ServerError) and error.code in RECONNECT_CODES

    def _start_reconnect(self, cause: BaseException, *, answered: bool) -> None:
        """The connection dropped: hold what was pending for the next one.

        ``answered``: the broker sent something on it after the WELCOME. The
        outage then starts over (a whole ``reconnect_deadline`` again, as
        the broker was usable), but the backoff does not (see HEALTHY_AFTER).

        A request that has now been pending on MAX_DROPS dropped connections
        fails instead (a PUBLISH too: resending it is safe, but its caller
        would wait for as long as the broker keeps dropping it). The count
        is taken here, over what is pending, so the publish path pays
        nothing for it.
        """
        self._reconnecting = True
        if self._healthy_timer is not None:  # it dropped before it proved healthy: the outage goes on
            self._healthy_timer.cancel()
            self._healthy_timer = None
        if self._outage_deadline is None or answered:
            self._outage_deadline = self._loop.time() + self.reconnect_deadline
        self._discard_unsent()  # encoded for the old connection; the requests are resent
        self._ack_reqs.clear()  # their answers are lost with the connection
        drops, self._drops = self._drops, {}  # only what is still pending keeps its count
        for req in sorted(self._pending):
            if req not in self._frames:  # the handshake of a connection that is gone
                self._fail(req, ConnectionLost(str(cause)))
            elif not self._dropped(req, drops.get(req, 0) + 1, cause):
                self._held.append(req)
        self._reconnect_task = self._loop.create_task(self._reconnect(cause))

    def _dropped(self, req: int, times: int, cause: BaseException, *, alone: bool = False) -> bool:
        """Count a drop of a connection that ``req`` was pending on; fail it
        on the MAX_DROPSth. Whether it failed."""
        if times < MAX_DROPS:
            self._drops[req] = times
            return False
        frame = self._frames.get(req)
        what = FrameType.PUBLISH if frame is None or isinstance(frame, bytes) else frame.TYPE
        error = ConnectionLost(
            f"the connection to {self.host}:{self.port} dropped {times} times while this "
            f"{what.name.lower()} request was pending"
            + (", the last time when it was the only request sent on it" if alone else "")
            + f", so it is not sent again (the last time: {cause})"
        )
        error.__cause__ = cause
        self._fail(req, error)
        return True

    def _resend(self, req: int, frame: Frame | bytes) -> bytes | None:
        """``frame`` encoded for the new connection; None if it no longer fits (it failed)."""
        try:
            if isinstance(frame, bytes):  # a fast-path PUBLISH, resent as it was
                return self._conn.send_again(frame, FrameType.PUBLISH)
            return self._conn.send(frame)
        except LocalProtocolError as exc:  # the new connection's frame limit is smaller
            self._fail(req, exc)
            return None

    def _fail(self, req: int, error: BaseException) -> None:
        """Fail request ``req`` (if still pending) with ``error``."""
        fut = self._forget(req)
        self._drops.pop(req, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)
            fut.exception()  # mark retrieved: the caller may have gone

    async def _probe(self) -> set[int]:
        """Resend each held request on its last chance alone, before anything else.

        A request pending on MAX_DROPS - 1 dropped connections may be one the
        broker drops the connection for, and so may any request resent with
        it. Sent alone (the oldest first, so order is kept; everything else
        held meanwhile), a drop is its own doing: it fails; an answer, or a
        connection that stays up for HEALTHY_AFTER, clears it, and it goes
        on as any other.

        Returns:
            The ``sub_id`` of each SUBSCRIBE it sent (not to be made again).

        Raises:
            ConnectionLost: the connection dropped (this attempt failed).
        """
        sock = self._sock
        assert sock is not None
        subs: set[int] = set()
        for req in [r for r in self._held if self._drops.get(r, 0) >= MAX_DROPS - 1]:
            fut, frame = self._pending.get(req), self._frames.get(req)
            if fut is None or fut.done() or frame is None:
                continue  # answered (or given up on by its caller) meanwhile
            if sock.finished:  # dropped after answering the one before: nobody to blame
                raise ConnectionLost(f"the connection to {self.host}:{self.port} dropped")
            data = self._resend(req, frame)
            if data is None:
                continue
            sock.write(data)
            await asyncio.wait((fut, sock.closed), timeout=HEALTHY_AFTER, return_when=asyncio.FIRST_COMPLETED)
            if sock.closed.done() and not fut.done():
                drop = ConnectionLost(
                    f"the connection to {self.host}:{self.port} dropped with a resent request alone on it"
                )
                self._dropped(req, self._drops.get(req, 0) + 1, drop, alone=True)
                raise drop
            self._held.remove(req)  # written on this connection: not again
            if type(frame) is Subscribe:
                subs.add(frame.sub_id)
        return subs

    async def _reconnect(self, cause: BaseException) -> None:
        """Try again with backoff until the outage's deadline, then resume.

        The backoff and the deadline carry over from the drop before, unless
        the connection in between stayed up for HEALTHY_AFTER: a connection
        that comes back and drops at once does not end the outage.
        """
        loop = self._loop
        deadline = self._outage_deadline
        assert deadline is not None  # set by _start_reconnect
        failed: BaseException | None = None  # why the last attempt to connect failed
        dropped = cause  # why the last connection dropped
        while True:
            delay = self._backoff
            self._backoff = min(max(delay * 2, BACKOFF_MIN), self.reconnect_max_delay)
            if delay:
                if loop.time() + delay > deadline:
                    if failed is None:  # it came back every time, and dropped again
                        error = ConnectionLost(
                            f"the connection to the broker at {self.host}:{self.port} kept dropping "
                            f"for {self.reconnect_deadline:g} s (the last time: {dropped})"
                        )
                        error.__cause__ = dropped
                    else:
                        error = ConnectionLost(
                            f"the broker at {self.host}:{self.port} stayed unreachable for "
                            f"{self.reconnect_deadline:g} s after {cause}: {failed}"
                        )
                        error.__cause__ = failed
                    self._reconnecting = False
                    self._held.clear()
                    self._fail_all(error, clean=False)
                    return
                await asyncio.sleep(delay)
            try:
                await self._open()
            except (ConnectionLost, RequestTimeout, OSError) as exc:
                failed = exc
                continue
            except ServerError as exc:
                if exc.code in RECONNECT_CODES:  # TOO_MANY_CONNECTIONS: the broker is full for now
                    failed = exc
                    continue
                # AuthFailed and friends: trying again will not help
                self._reconnecting = False
                self._held.clear()
                self._fail_all(exc, clean=False)
                return
            failed = None
            try:
                probed_subs = await self._probe()
                break
            except ConnectionLost as exc:
                dropped = exc
        self.reconnects += 1
        self._reconnecting = False
        self._healthy_timer = loop.call_later(HEALTHY_AFTER, self._proven_healthy)
        logger.info("%s: reconnected (conn %d) after %s", self.url, self.conn_id, cause)
        held, self._held = self._held, []
        pending_subs = {f.sub_id for r in held if type(f := self._frames.get(r)) is Subscribe} | probed_subs
        # Acks and requests made meanwhile go first, so an ack of a message
        # delivered before the drop lands before that message could come again.
        if self._acks:
            self._write_acks()
        for req in held:
            frame = self._frames.get(req)
            if frame is None or req not in self._pending:
                continue
            data = self._resend(req, frame)
            if data is not None:
                self._wbuf.append(data)
        for sub in list(self._subs.values()):
            if sub.sub_id in pending_subs or sub._ended:
                continue  # its own SUBSCRIBE is about to be resent, or it ended (its resend failed)
            if sub.durable is not None or sub._last_offset is None:
                kind, value = ("new", None)
            else:
                kind, value = ("offset", sub._last_offset + 1)
            ack_wait_ms, max_deliveries, dead_letter = sub._settings
            fut = self._send_request(
                Subscribe(0, sub.sub_id, sub.queue, sub.events, sub.durable, kind, value, sub.prefetch,
                          ack_wait_ms, max_deliveries, dead_letter)
            )  # fmt: skip
            fut.add_done_callback(functools.partial(_resubscribed, sub))
        # Everything pending gets a whole timeout from now (the time spent
        # reconnecting does not count against it).
        self._unmark()
        self._flush()

    def _proven_healthy(self) -> None:
        """The connection stayed up for HEALTHY_AFTER: the outage is over."""
        self._healthy_timer = None
        self._backoff = 0.0
        self._outage_deadline = None


def _resubscribed(sub: Subscription, fut: asyncio.Future[Frame]) -> None:
    """A subscription could not be re-established after a reconnect: end it
    with the reason, and forget it (no later reconnect tries it again)."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        sub._end(exc)
        sub._client._drop_sub(sub)
