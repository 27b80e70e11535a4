"""A session's publish path, a base class of :class:`broker.session.Session`.

Publishes from one read are appended to each queue in one ``write()``; their
PUBACKs leave together when the committer has synced them (``confirm``). A
PUBLISH with a ``message_id`` is deduplicated by it; one from a named
producer (HELLO) by its sequence number, its ``req``: a resend (a req not
above the producer's last one in the queue) is answered with the stored
offset, and each batch records its runs of sequence numbers in the
``x-producer-seq`` header (spec section 4). More than
``max_inflight_publishes`` unconfirmed publishes stops reading the socket
until confirms catch up. ``write`` and ``reply_error``, the session's
output, live here too.

The hot path is :meth:`Publishing._dispatch`, the loop over a read's
events: a plain PUBLISH (no headers or message_id) to names this
connection has used is a ``SplicedPublish`` tuple from
``Connection.events_spliced``, and its record body is the packed event, the
packed timestamp, nil and the packed payload, concatenated, with no object
and no call per message. A ``bin`` payload (what a client sends for
``bytes``) is copied as sent, never decoded. The body is byte for byte what
:func:`protocol.encode_record` writes for the decoded frame (the tests
check). Other PUBLISHes take :meth:`Publishing._on_publish`.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Iterable
from itertools import repeat
from typing import TYPE_CHECKING, Any, Literal

from protocol import (
    PRODUCER_HEADER,
    Connection,
    ErrorCode,
    Event,
    Publish,
    SplicedPublish,
    encode_pubacks,
    encode_record,
)

from .log import LogFailedError
from .queue import MESSAGE_ID_HEADER, Queue, QueueUnavailable, with_header

if TYPE_CHECKING:
    from .config import BrokerConfig
    from .server import Broker
    from .users import User

__all__ = ["SEQUENCE_HEADER_ROOM", "Publishing"]

#: Bytes a producer's record may grow by when it gets the x-producer-seq
#: header: key, "PRODUCER:FIRST-LAST" (64-character id, two u64), map header.
SEQUENCE_HEADER_ROOM = 128


#: The publishes of one read for one queue, stored together: record bodies,
#: their reqs, and the message ids of those that have one (by index).
Pending = tuple[list[bytes], list[int], dict[int, str]]


class Publishing:
    """The publish path of a session (see the module docstring); Session sets the state."""

    broker: Broker
    config: BrokerConfig
    conn: Connection
    transport: asyncio.Transport | None
    closed: bool
    write_paused: bool
    #: The producer id from HELLO: this session's PUBLISH reqs are its sequence.
    producer: str | None
    #: The user of the users file this connection authenticated as (None without one).
    user: User | None
    unconfirmed: int
    #: The peer said BYE: the connection closes once every reply is sent (Session._on_bye).
    _bye: bool
    _reading_paused: bool
    _batch: dict[Queue, Pending]
    _now_ms: int
    #: pack(_now_ms) + nil: the middle of every spliced record body of this read.
    _stamp: bytes
    _max_record: int
    _queues: dict[str, Queue]
    _handlers: dict[type[Any], Any]

    if TYPE_CHECKING:  # Session's

        def internal_error(self, req: int) -> None: ...
        def close_if_answered(self) -> None: ...

    def write(self, data: bytes) -> None:
        """Write bytes to the peer now (no-op once closed)."""
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _owe(self, n: int) -> None:
        """``n`` more publishes await their confirm (the store counts publishing connections)."""
        if not self.unconfirmed:
            self.broker.store.publishers += 1
        self.unconfirmed += n

    def _paid(self, n: int) -> None:
        """``n`` publishes were answered (called after their answers are written)."""
        self.unconfirmed -= n
        if not self.unconfirmed:
            self.broker.store.publishers -= 1
            if self._bye:
                self.close_if_answered()

    def confirm(self, acks: list[tuple[int, int, bool]]) -> None:
        """Send PUBACKs (the queue calls this once the records are committed)."""
        self.write(encode_pubacks(acks))  # (a no-op once closed)
        self._paid(len(acks))
        if self._reading_paused and self.unconfirmed <= self.config.max_inflight_publishes // 2 and not self._bye:
            self._reading_paused = False
            if not self.write_paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def fail(self, acks: list[tuple[int, int, bool]], code: ErrorCode, message: str) -> None:
        """Answer unconfirmed publishes with ERR (the store failed before syncing them)."""
        for req, _offset, _dup in acks:
            self.reply_error(req, code, message)
        self._paid(len(acks))

    def reply_error(self, req: int, code: ErrorCode, message: str) -> None:
        """Answer request ``req`` with ERR; the connection stays open."""
        self.write(self.conn.send_error(req, code, message))

    def _queue(self, req: int, name: str) -> Queue | None:
        try:
            queue = self.broker.store.get(name, create=True)
        except QueueUnavailable as exc:
            self.reply_error(req, exc.code, str(exc))
            return None
        except OSError as exc:
            self.reply_error(req, _storage_code(exc), f"cannot create queue {name!r}: {exc}")
            return None
        assert queue is not None
        return queue

    def denied(self, req: int, right: Literal["publish", "subscribe", "delete"], queue: str) -> bool:
        """Whether this connection's user lacks ``right`` (publish, subscribe,
        delete) on ``queue``; if so, answer PERMISSION_DENIED. Checked before
        anything is looked up or created, so a refusal changes nothing."""
        user = self.user
        if user is None or getattr(user, right)(queue):
            return False
        self.reply_error(
            req, ErrorCode.PERMISSION_DENIED, f"user {user.name!r} has no {right} right on queue {queue!r}"
        )
        return True

    def _on_publish(self, ev: Publish) -> None:
        if self.user is not None and self.denied(ev.req, "publish", ev.queue):
            return
        queue = self._queues.get(ev.queue) or self._queue(ev.req, ev.queue)
        if queue is None:
            return
        mid = ev.message_id
        headers = ev.headers
        if headers and (PRODUCER_HEADER in headers or MESSAGE_ID_HEADER in headers):
            # The broker's own (SPEC section 4): a forged x-message-id would be taken for an id at start-up.
            headers = {k: v for k, v in headers.items() if k != PRODUCER_HEADER and k != MESSAGE_ID_HEADER}
        if mid is not None:
            pending = self._batch.get(queue)
            if pending is not None and mid in pending[2].values():
                self._flush_publishes()  # the same id twice in one read: the first must be known
            dup = queue.find_duplicate(mid, time.monotonic())
            if dup is not None:
                self._owe(1)
                queue.expect_confirm(dup + 1, self, [(ev.req, dup, True)])
                return
            # Stored with the record, so the dedup index survives a restart.
            headers = {**headers, MESSAGE_ID_HEADER: mid} if headers else {MESSAGE_ID_HEADER: mid}
        elif self.producer is not None:
            seen = queue.producers.get(self.producer)
            if seen is not None and ev.req <= seen[0] and self._resent(queue, ev.req):
                return
        try:
            body = encode_record(ev.event, self._now_ms, headers, ev.payload)
        except Exception as exc:  # only reachable with exotic decoded values
            self.reply_error(ev.req, ErrorCode.BAD_REQUEST, str(exc))
            return
        if len(body) > self._max_record:
            self._too_large(ev.req, len(body))
            return
        pending = self._pending(queue)
        if mid is not None:
            pending[2][len(pending[0])] = mid
        pending[0].append(body)
        pending[1].append(ev.req)

    def _dispatch(self, events: list[Event | SplicedPublish]) -> None:
        """Handle the events of one read in order; plain PUBLISHes inline.

        A spliced PUBLISH (see ``Connection.events_spliced``) is handled here
        without a call: it gets what :meth:`_on_publish` does for a PUBLISH
        without headers or message_id, and the record body
        ``encode_record(event, now, None, payload)`` would write, by
        concatenation. A run of them to one queue looks the queue, its batch
        and the producer's last sequence up once: nothing changes those until
        the batch is flushed, which only another event does (and ends the
        run). Any other event first flushes the batch (replies keep the order
        of requests), then goes to its handler; a handler that raises (a bug
        of ours) gets its request answered INTERNAL and ends the connection.
        """
        handlers = self._handlers
        queues = self._queues
        producer = self.producer
        user = self.user
        stamp = self._stamp
        max_record = self._max_record
        run: str | None = None  # the queue name of the current run of spliced publishes
        for event in events:
            if type(event) is tuple:
                req, name, head, payload = event
                if name is not run:  # the names cache hands out one str per queue + event
                    if user is not None and self.denied(req, "publish", name):
                        run = None
                        continue
                    found = queues.get(name) or self._queue(req, name)
                    if found is None:
                        run = None
                        continue
                    run, queue, pending = name, found, None
                    seen = queue.producers.get(producer) if producer is not None else None
                    high = -1 if seen is None else seen[0]
                if req <= high and self._resent(queue, req):
                    continue
                body = head + stamp + payload
                if len(body) > max_record:
                    self._too_large(req, len(body))
                    continue
                if pending is None:  # (not before: a batch must not be empty)
                    pending = self._pending(queue)
                    add_body, add_req = pending[0].append, pending[1].append
                add_body(body)
                add_req(req)
                continue
            run = None
            if type(event) is not Publish and self._batch:
                self._flush_publishes()
            try:
                handlers[type(event)](event)
            except Exception:  # (a try costs nothing until it catches, on 3.11+)
                self.internal_error(getattr(event, "req", 0))
                return
            if self.closed:
                return
        if self._batch:
            self._flush_publishes()

    def _pending(self, queue: Queue) -> Pending:
        """This read's batch for ``queue``, started if need be."""
        pending = self._batch.get(queue)
        if pending is None:
            pending = self._batch[queue] = ([], [], {})
        return pending

    def _too_large(self, req: int, size: int) -> None:
        self.reply_error(
            req, ErrorCode.PAYLOAD_TOO_LARGE, f"message of {size} bytes exceeds the limit of {self._max_record} bytes"
        )

    def _resent(self, queue: Queue, req: int) -> bool:
        """Whether a producer's publish whose req is not above its last one stored
        in ``queue`` is a resend (it has that req); if so it is confirmed with the
        original offset. True too when the log cannot be read to tell (it is
        answered STORAGE_FAILED)."""
        assert self.producer is not None
        oldest_ms = self._now_ms - int(self.config.dedup_window * 1000)
        try:
            dup = queue.find_sequence(self.producer, req, oldest_ms)
        except OSError as exc:  # (EIO) cannot tell whether it is stored: refuse it rather than store it twice
            why = f"cannot look for a resent publish in {queue.name!r}: {exc.strerror or exc}"
            self.reply_error(req, ErrorCode.STORAGE_FAILED, why)
            return True
        if dup is None:
            return False
        self._owe(1)
        queue.expect_confirm(dup + 1, self, [(req, dup, True)])
        return True

    def _flush_publishes(self) -> None:
        batch, self._batch = self._batch, {}
        store = self.broker.store
        if store.fatal:
            for _bodies, reqs, _mids in batch.values():
                for req in reqs:
                    self.reply_error(req, ErrorCode.STORAGE_FAILED, "storage failed; not accepting publishes")
            return
        now_ms = self._now_ms
        dedup_until = time.monotonic() + self.config.dedup_window
        for queue, (bodies, reqs, mids) in batch.items():
            if self.producer is not None:
                _tag_sequences(self.producer, bodies, reqs)
            try:
                first = queue.append(
                    bodies, now_ms, dedup_until=dedup_until, ids=mids,
                    producer=None if self.producer is None else (self.producer, reqs[-1]),
                )  # fmt: skip
            except LogFailedError as exc:
                # An fsync failed (a segment roll's, or the cut of a failed write's): fail-stop
                # (R7). No answer: what reached the file is unknown; the connection drops.
                store.fail(f"fsync failed: {exc}")
                return
            except OSError as exc:
                code = _storage_code(exc)
                for req in reqs:
                    self.reply_error(req, code, f"cannot store message in {queue.name!r}: {exc.strerror or exc}")
                continue
            self._owe(len(bodies))
            end = first + len(bodies)
            queue.expect_confirm(end, self, list(zip(reqs, range(first, end), repeat(False))))
            store.appended(queue)
        if self.unconfirmed > self.config.max_inflight_publishes and not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()


def _tag_sequences(producer: str, bodies: list[bytes], reqs: list[int]) -> None:
    """Mark a producer's batch for one queue with its sequence numbers (its reqs).

    Stored with the records, so the broker finds a resent publish and knows
    each producer's last sequence after a restart. Not every record pays for
    it: the first record of each run of consecutive reqs gets the header
    ``x-producer-seq: "PRODUCER:FIRST-LAST"`` ("PRODUCER:N" for a run of one);
    the run's records are at consecutive offsets from that record's.
    """
    n = len(reqs)
    if reqs[-1] - reqs[0] == n - 1 and reqs == list(range(reqs[0], reqs[-1] + 1)):
        ends: Iterable[int] = (n,)  # the usual batch, one run (checked in C)
    else:
        ends = [i for i in range(1, n + 1) if i == n or reqs[i] != reqs[i - 1] + 1]
    start = 0
    for end in ends:
        first, last = reqs[start], reqs[end - 1]
        value = f"{producer}:{first}" if first == last else f"{producer}:{first}-{last}"
        bodies[start] = with_header(bodies[start], PRODUCER_HEADER, value)
        start = end


def _storage_code(exc: OSError) -> ErrorCode:
    return ErrorCode.STORAGE_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.STORAGE_FAILED
