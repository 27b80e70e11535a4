"""Messages and subscriptions, as the application sees them.

A :class:`Subscription` is an async iterator and an async context manager:

    async with await client.subscribe("DB", events=["CREATE"], durable="logger") as sub:
        async for msg in sub:
            await msg.ack()

Delivered messages wait in the subscription's buffer. A durable subscription
never holds more than ``prefetch`` unacked messages (the broker stops at the
window). An ephemeral one is bounded by ``max_pending``: past it the client
stops reading the socket until the application catches up, and TCP makes the
broker pause this connection, so memory stays bounded either way.

Acks are cheap: ``await msg.ack()`` queues the offset and returns; the acks
of one event-loop turn leave as one ACK frame per durable (and one every
128 acks within a turn, or every half prefetch if that is less, so a
subscriber working through its window returns credit as it goes). A
rejected ack (say, for a message the broker already redelivered elsewhere)
is logged and kept in ``sub.ack_errors`` (of each subscription to that
durable on the connection); ``await msg.ack(wait=True)`` waits for the
broker's answer and raises instead.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from protocol import LOST_EVENT, ConfigError, ConnectionClosed, ServerError, TidingsError

if TYPE_CHECKING:
    import asyncio

    from .client import Client

__all__ = ["Message", "Subscription"]

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Message:
    """One delivered message.

    Attributes:
        queue: the queue it was published to.
        event: its event name.
        payload: any msgpack value.
        headers: string headers, or an empty dict.
        offset: its position in the queue (dense, from 0).
        timestamp: when the broker stored it, in ms since the epoch.
        deliveries: 1 the first time; more when redelivered.
        durable: the durable it was delivered through (None: ephemeral or plain read).
    """

    queue: str
    event: str
    payload: Any
    headers: dict[str, str]
    offset: int
    timestamp: int
    deliveries: int = 1
    durable: str | None = None
    _client: Client | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)

    @property
    def lost(self) -> bool:
        """Whether this stands for a message lost to damage (event ``tidings.lost``).

        The broker's ``--repair`` puts one where a damaged record was; its
        payload says what happened. Every subscription gets it whatever its
        event filter. Acknowledge it like any message.
        """
        return self.event == LOST_EVENT

    @property
    def redelivered(self) -> bool:
        """Whether this message was delivered before (to this durable)."""
        return self.deliveries > 1

    async def ack(self, *, wait: bool = False) -> None:
        """Acknowledge: the durable's cursor may move past this message.

        A no-op for ephemeral subscriptions and plain reads (nothing to ack).

        Args:
            wait: wait for the broker's answer (raises on refusal).

        Raises:
            BadRequest: with ``wait=True``, the broker refused the ack, with
                code BAD_ACK: the message is no longer in flight (its ack
                wait ran out and it went out again, say).
            ConnectionClosed, ConnectionLost: the connection is gone.
        """
        if self.durable is None or self._client is None or self._settled:
            return
        self._settled = True
        await self._client._ack(self.queue, self.durable, self.offset, wait=wait)

    async def in_progress(self) -> None:
        """Still working on it: restart the ack wait so it is not redelivered yet.

        Raises:
            BadRequest: the broker refused, with code BAD_ACK: the message
                is no longer in flight.
        """
        if self.durable is None or self._client is None or self._settled:
            return
        await self._client._progress(self.queue, self.durable, self.offset)

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back: it is redelivered after ``delay`` seconds.

        Raises:
            BadRequest: the broker refused, with code BAD_ACK: the message
                is no longer in flight.
        """
        if self.durable is None or self._client is None or self._settled:
            return
        self._settled = True
        await self._client._nack(self.queue, self.durable, self.offset, delay)


class Subscription:
    """A push subscription: iterate it to receive messages.

    Created by :meth:`Client.subscribe`. Iterating it ends
    (``StopAsyncIteration``) after :meth:`close` or the client's ``aclose()``;
    otherwise it raises the error that ended the subscription: the one that
    broke the client (see :class:`Client`: ConnectionLost when the
    connection broke and was not re-established, ShuttingDown when the
    broker stopped with ``reconnect=False``, AuthFailed...), or the broker's
    refusal to subscribe again after a reconnect (PermissionDenied, a plain
    ServerError for QUEUE_CORRUPT...).
    """

    def __init__(
        self,
        client: Client,
        sub_id: int,
        queue: str,
        events: tuple[str, ...],
        durable: str | None,
        prefetch: int,
        max_pending: int,
    ) -> None:
        self._client = client
        self.sub_id = sub_id
        self.queue = queue
        self.events = events
        self.durable = durable
        self.prefetch = prefetch
        self.max_pending = max_pending
        self.ack_errors: collections.deque[ServerError] = collections.deque(maxlen=100)
        self.delivered = 0
        self._buffer: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._ended = False
        #: Last offset delivered: an ephemeral subscription resumes after it.
        self._last_offset: int | None = None
        #: (ack_wait_ms, max_deliveries, dead_letter), for subscribing again.
        self._settings: tuple[int, int, str | None] = (0, 0, None)

    def __repr__(self) -> str:
        state = "ended" if self._ended else "active"
        return (
            f"<Subscription {self.sub_id} {self.queue} events={list(self.events)} "
            f"durable={self.durable!r} {state} pending={len(self._buffer)} delivered={self.delivered}>"
        )

    @property
    def pending(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._buffer)

    # --- fed by the client's reader -------------------------------------------

    def _deliver(self, msg: Message) -> None:
        self._buffer.append(msg)
        self.delivered += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the application's side ---------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        while not self._buffer:
            if self._ended:
                if self._error is not None:
                    raise self._error.with_traceback(None)  # (not one traceback longer per call)
                raise StopAsyncIteration
            self._waiter = self._client._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._buffer.popleft()
        if len(self._buffer) == self.max_pending // 2:
            self._client._maybe_resume_reading()
        return msg

    async def next(self, timeout: float | None = None) -> Message:
        """The next message, waiting up to ``timeout`` seconds.

        Raises:
            TimeoutError: nothing arrived in time.
            ConnectionClosed: the subscription was closed.
            TidingsError: the error that ended it (see the class docstring).
        """
        import asyncio

        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except StopAsyncIteration:
            raise ConnectionClosed("subscription is closed") from None

    async def close(self, *, ack: Message | Iterable[Message] = ()) -> None:
        """Unsubscribe. A durable's cursor stays on the broker. Harmless twice.

        Args:
            ack: a message, or messages, of this subscription's durable to
                acknowledge in the same write as the UNSUBSCRIBE, so the
                broker sends nothing more for them. (Each ack before it may
                bring one more message, which then goes back unseen with a
                delivery counted; for a consumer that takes exactly N, say:
                ``await sub.close(ack=last)``.) Messages already acked, and
                those of ephemeral subscriptions, are skipped.

        Raises:
            ConfigError: ``ack`` holds something other than a message of
                this subscription's durable; nothing was done (the
                subscription is still open).
            BadRequest: the broker refused some of those acks, with code
                BAD_ACK (the subscription is closed all the same).
        """
        messages = self._own(ack)
        if self._ended:
            return
        self._end(None)
        offsets = []
        for m in messages:
            if m.durable is not None and not m._settled:
                m._settled = True
                offsets.append(m.offset)
        try:
            refused = await self._client._unsubscribe(self, tuple(offsets))
        except (ConnectionClosed, TidingsError) as exc:
            logger.debug("unsubscribe of %d: %s", self.sub_id, exc)
            return
        if refused is not None:
            raise refused

    def _own(self, ack: Message | Iterable[Message]) -> list[Message]:
        """``close()``'s ``ack`` as a list, checked: each a Message of this
        subscription's queue and durable (or an ephemeral one, acked by nobody).

        Raises:
            ConfigError: anything else (its ack would go to this durable).
        """
        if isinstance(ack, Message):
            return [ack]
        try:
            messages = list(ack)
        except TypeError:
            raise ConfigError(f"ack takes a Message or messages, not {type(ack).__name__}") from None
        for m in messages:
            if not isinstance(m, Message):
                raise ConfigError(f"ack takes a Message or messages, not {type(m).__name__}")
            if m.durable is not None and (m.queue, m.durable) != (self.queue, self.durable):
                raise ConfigError(
                    f"ack takes messages of this subscription's durable {self.durable!r} of {self.queue!r}, "
                    f"not one of durable {m.durable!r} of {m.queue!r} (offset {m.offset})"
                )
        return messages

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
