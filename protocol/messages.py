"""Every frame of the tidings protocol, as a frozen dataclass.

Wire form: each frame body is one msgpack array ``[TYPE, field1, field2, ...]``
whose fields are the dataclass fields in declaration order. ``to_wire()``
builds that list; ``FRAME_CLASSES[TYPE].from_wire(list)`` rebuilds the
object. ``__post_init__`` validates every field, so a receiver never sees a
half-valid frame:

* a field of the wrong *type or shape* is a protocol violation
  (``LocalProtocolError`` when we build it, ``RemoteProtocolError`` with
  MALFORMED_FRAME when the peer sent it);
* a well-typed field with an unacceptable *value* (a bad queue name, a
  negative prefetch) is a request error carrying its own code
  (INVALID_NAME, BAD_REQUEST); the receiving Connection turns it into an
  :class:`InvalidRequest` event so the broker can answer with ERR and keep the
  connection.

The :class:`Frame` base, the decorator and the field checks are in
:mod:`protocol.frame`; the byte-level encoders and decoders of the hot path
(record bodies, DELIVER, BATCH, PUBACK) are in :mod:`protocol.wire`.

Request ids: every request carries ``req`` (an unsigned int); its reply
echoes it. ``req = 0`` is reserved for frames that expect no reply (an ACK
sent "fire and forget", a broker-initiated ERR or BYE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, cast

from .errors import ErrorCode
from .frame import (
    _MAX_U64,
    _VALID,
    START_KINDS,
    Frame,
    FrameType,
    _fail,
    _frame,
    _headers,
    _int_tuple,
    _name,
    _opt_str,
    _set,
    _start,
    _uint,
)
from .names import check_durable, check_event, check_pattern, check_queue

__all__ = [
    "FRAME_CLASSES",
    "MAX_MESSAGE_ID_LENGTH",
    "MAX_PRODUCER_LENGTH",
    "PRODUCER_HEADER",
    "PROTOCOL_VERSION",
    "START_KINDS",
    "STATUS_SECTIONS",
    "Ack",
    "Batch",
    "Bye",
    "Delete",
    "Deliver",
    "Err",
    "Fetch",
    "Frame",
    "FrameType",
    "Hello",
    "InvalidRequest",
    "Nack",
    "Ok",
    "Ping",
    "Pong",
    "Progress",
    "PubAck",
    "Publish",
    "Record",
    "Seek",
    "Status",
    "StatusReply",
    "Subscribe",
    "Unsubscribe",
    "Welcome",
]

#: Bumped on any incompatible change to a frame's fields.
PROTOCOL_VERSION: Final = 1
#: Longest producer id a HELLO may carry.
MAX_PRODUCER_LENGTH: Final = 64
#: Longest message_id a PUBLISH may carry (AMQP's message-id is a short
#: string of 255 bytes): the broker keeps each id in memory for its dedup
#: window, so an id as long as a message would be memory, not disk.
MAX_MESSAGE_ID_LENGTH: Final = 255
#: The header in which the broker stores a producer's sequence numbers with
#: its records, "PRODUCER:FIRST-LAST" on the first record of each run (spec
#: section 4); the client leaves it out of ``Message.headers``.
PRODUCER_HEADER: Final = "x-producer-seq"
#: The lists of a STATUS_REPLY, in order; a reply cut into pages goes on in
#: ``more``'s section (spec section 6).
STATUS_SECTIONS: Final = ("connections", "queues", "durables", "failed_queues")


@_frame
class Hello(Frame):
    """Client -> broker, first frame: protocol version, client name, credentials.

    ``producer``, when given, names this client as a producer whose PUBLISH
    ``req`` ids are its sequence numbers (see the spec, section 4): a PUBLISH
    resent after a reconnect with the same producer and req is stored once.
    The field may be left out on the wire (a 4-field HELLO).
    """

    TYPE = FrameType.HELLO
    req: int
    version: int
    name: str
    credentials: dict[str, Any] | None = None
    producer: str | None = None

    def __post_init__(self) -> None:
        _uint("HELLO", "req", self.req)
        _uint("HELLO", "version", self.version)
        if type(self.name) is not str or len(self.name) > 256:
            _fail("HELLO", "name must be a string of at most 256 characters")
        if self.credentials is not None and type(self.credentials) is not dict:
            _fail("HELLO", "credentials must be a map or nil")
        if self.producer is not None and (
            type(self.producer) is not str or not 0 < len(self.producer) <= MAX_PRODUCER_LENGTH
        ):
            _fail("HELLO", f"producer must be nil or a string of 1 to {MAX_PRODUCER_LENGTH} characters")

    @classmethod
    def from_wire(cls, items: list[Any]) -> Frame:
        """Accept the 4-field HELLO of clients that do not name a producer."""
        if len(items) == 5:
            items = [*items, None]
        return super(Hello, cls).from_wire(items)  # noqa: UP008 (see Publish.from_wire)


@_frame
class Welcome(Frame):
    """Broker -> client, reply to HELLO: the session's parameters."""

    TYPE = FrameType.WELCOME
    req: int
    version: int
    server: str
    conn_id: int
    max_frame_size: int
    heartbeat: float

    def __post_init__(self) -> None:
        _uint("WELCOME", "req", self.req)
        _uint("WELCOME", "version", self.version)
        _uint("WELCOME", "conn_id", self.conn_id)
        _uint("WELCOME", "max_frame_size", self.max_frame_size)
        if type(self.server) is not str:
            _fail("WELCOME", "server must be a string")
        if type(self.heartbeat) not in (int, float) or not self.heartbeat >= 0:
            _fail("WELCOME", "heartbeat must be a non-negative number")


@_frame
class Publish(Frame):
    """Client -> broker: store one message; answered by PUBACK once durable."""

    TYPE = FrameType.PUBLISH
    req: int
    queue: str
    event: str
    payload: Any = None
    headers: dict[str, str] | None = None
    message_id: str | None = None

    def __post_init__(self) -> None:
        _uint("PUBLISH", "req", self.req)
        _name("PUBLISH", self.queue, check_queue)
        _name("PUBLISH", self.event, check_event)
        _headers("PUBLISH", self.headers)
        if self.message_id is not None:  # (nothing more to check on the usual path: no id)
            _opt_str("PUBLISH", "message_id", self.message_id)
            # An empty id is most likely an unset variable (--id "$ID"): every publish
            # with it after the first would be taken for a duplicate and dropped.
            if not self.message_id:
                _fail("PUBLISH", "message_id must not be empty (nil for none)", ErrorCode.BAD_REQUEST)
            if len(self.message_id) > MAX_MESSAGE_ID_LENGTH:
                _fail(
                    "PUBLISH",
                    f"message_id of {len(self.message_id)} characters, more than {MAX_MESSAGE_ID_LENGTH}",
                    ErrorCode.BAD_REQUEST,
                )

    @classmethod
    def from_wire(cls, items: list[Any]) -> Frame:
        """The broker's hot path: a PUBLISH to names seen before, without headers or id.

        Checks exactly what ``__post_init__`` checks, inline, and fills the
        slots without the generated ``__init__``; anything else takes the
        general path, which also words the errors.
        """
        if len(items) == 7:
            _, req, queue, event, payload, headers, message_id = items
            if (
                type(req) is int
                and 0 <= req <= _MAX_U64
                and headers is None
                and message_id is None
                and type(queue) is str  # (a list or a map is unhashable: the set lookup would raise)
                and queue in _KNOWN_QUEUES
                and type(event) is str
                and event in _KNOWN_EVENTS
            ):
                self: Any = _new_frame(cls)  # Any: fields are read-only to type checkers
                self.req = req
                self.queue = queue
                self.event = event
                self.payload = payload
                self.headers = None
                self.message_id = None
                return self  # type: ignore[no-any-return]
        # Explicit super(): dataclass(slots=True) replaces the class, so the
        # zero-argument form would name the discarded original.
        return super(Publish, cls).from_wire(items)  # noqa: UP008

    @classmethod
    def unchecked(cls, req: int, queue: str, event: str, payload: Any, message_id: str | None) -> Publish:
        """A PUBLISH without headers whose fields the caller has already checked
        (the client's fast path), filled without ``__init__``. ``from_wire``
        does the same inline: a call per frame costs the broker too much."""
        self: Any = _new_frame(cls)
        self.req = req
        self.queue = queue
        self.event = event
        self.payload = payload
        self.headers = None
        self.message_id = message_id
        return self  # type: ignore[no-any-return]


# Publish.from_wire's name caches: the same set objects _name() fills (it
# only ever clears them, never replaces them).
_KNOWN_QUEUES: Final = _VALID.setdefault(check_queue, set())
_KNOWN_EVENTS: Final = _VALID.setdefault(check_event, set())
_new_frame: Final = object.__new__


@_frame
class PubAck(Frame):
    """Broker -> client: the message is stored (and synced, per policy)."""

    TYPE = FrameType.PUBACK
    req: int
    offset: int
    duplicate: bool = False  # true: message_id seen before; offset is the original's

    def __post_init__(self) -> None:
        _uint("PUBACK", "req", self.req)
        _uint("PUBACK", "offset", self.offset)
        if type(self.duplicate) is not bool:
            _fail("PUBACK", "duplicate must be a boolean")

    @classmethod
    def from_wire(cls, items: list[Any]) -> Frame:
        """The client's hot path: ``__post_init__``'s checks inline (see Publish.from_wire)."""
        if len(items) == 4:
            _, req, offset, duplicate = items
            if (
                type(req) is int
                and type(offset) is int
                and type(duplicate) is bool
                and 0 <= req <= _MAX_U64
                and 0 <= offset <= _MAX_U64
            ):
                self: Any = _new_frame(cls)
                self.req = req
                self.offset = offset
                self.duplicate = duplicate
                return self  # type: ignore[no-any-return]
        return super(PubAck, cls).from_wire(items)  # noqa: UP008 (see Publish.from_wire)


@_frame
class Subscribe(Frame):
    """Client -> broker: start a push subscription ``sub_id`` on ``queue``.

    ``events`` filters by event name (``*`` wildcards; empty = all).
    ``durable`` names a cursor kept across disconnects; None = ephemeral.
    ``start``: ``new``, ``earliest``, ``offset`` (``start_value`` = offset) or
    ``time`` (``start_value`` = ms since the epoch); it only applies when the
    durable is created. ``prefetch`` caps unacked messages in flight.
    ``ack_wait_ms``: redeliver what is unacked after this long (0 = default).
    ``max_deliveries``: 0 = unlimited. ``dead_letter``: queue for messages
    that reached max_deliveries (None = ``<queue>.dead``).
    """

    TYPE = FrameType.SUBSCRIBE
    req: int
    sub_id: int
    queue: str
    events: tuple[str, ...] = ()
    durable: str | None = None
    start: str = "new"
    start_value: int | None = None
    prefetch: int = 100
    ack_wait_ms: int = 0
    max_deliveries: int = 0
    dead_letter: str | None = None

    def __post_init__(self) -> None:
        f = "SUBSCRIBE"
        _uint(f, "req", self.req)
        _uint(f, "sub_id", self.sub_id)
        _name(f, self.queue, check_queue)
        if type(self.events) not in (list, tuple):
            _fail(f, "events must be an array")
        for e in self.events:
            _name(f, e, check_pattern)
        _set(self, "events", tuple(self.events))
        if self.durable is not None:
            _name(f, self.durable, check_durable)
        _start(f, self.start, self.start_value)
        _uint(f, "prefetch", self.prefetch, 1 << 20)
        if self.prefetch == 0:
            _fail(f, "prefetch must be at least 1", ErrorCode.BAD_REQUEST)
        _uint(f, "ack_wait_ms", self.ack_wait_ms, 1 << 40)
        _uint(f, "max_deliveries", self.max_deliveries, 1 << 31)
        if self.dead_letter is not None:
            _name(f, self.dead_letter, check_queue)


@_frame
class Unsubscribe(Frame):
    """Client -> broker: end push subscription ``sub_id`` (a durable's cursor stays)."""

    TYPE = FrameType.UNSUBSCRIBE
    req: int
    sub_id: int

    def __post_init__(self) -> None:
        _uint("UNSUBSCRIBE", "req", self.req)
        _uint("UNSUBSCRIBE", "sub_id", self.sub_id)


@_frame
class Deliver(Frame):
    """Broker -> client: one message for push subscription ``sub_id``.

    ``deliveries`` counts how often this message went to the durable (1 =
    first time; more = redelivered).
    """

    TYPE = FrameType.DELIVER
    sub_id: int
    offset: int
    deliveries: int
    event: str
    timestamp: int
    headers: dict[str, str] | None
    payload: Any

    def __post_init__(self) -> None:
        _uint("DELIVER", "sub_id", self.sub_id)
        _uint("DELIVER", "offset", self.offset)
        _uint("DELIVER", "deliveries", self.deliveries)
        _uint("DELIVER", "timestamp", self.timestamp)
        if type(self.event) is not str:
            _fail("DELIVER", "event must be a string")
        _headers("DELIVER", self.headers)


@_frame
class Ack(Frame):
    """Client -> broker: acknowledge messages of durable ``durable`` on ``queue``.

    ``offsets`` are acked one by one; ``upto``, when set, acks every offset
    <= it ("cumulative"). ``req = 0`` asks for no OK (errors still come).
    """

    TYPE = FrameType.ACK
    req: int
    queue: str
    durable: str
    offsets: tuple[int, ...] = ()
    upto: int | None = None

    def __post_init__(self) -> None:
        _uint("ACK", "req", self.req)
        _name("ACK", self.queue, check_queue)
        _name("ACK", self.durable, check_durable)
        _set(self, "offsets", _int_tuple("ACK", "offsets", self.offsets))
        if self.upto is not None:
            _uint("ACK", "upto", self.upto)


@_frame
class Nack(Frame):
    """Client -> broker: give messages back for redelivery after ``delay_ms``."""

    TYPE = FrameType.NACK
    req: int
    queue: str
    durable: str
    offsets: tuple[int, ...] = ()
    delay_ms: int = 0

    def __post_init__(self) -> None:
        _uint("NACK", "req", self.req)
        _name("NACK", self.queue, check_queue)
        _name("NACK", self.durable, check_durable)
        _set(self, "offsets", _int_tuple("NACK", "offsets", self.offsets))
        _uint("NACK", "delay_ms", self.delay_ms, 1 << 40)


@_frame
class Progress(Frame):
    """Client -> broker: still working on these in-flight offsets; restart their ack wait."""

    TYPE = FrameType.PROGRESS
    req: int
    queue: str
    durable: str
    offsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _uint("PROGRESS", "req", self.req)
        _name("PROGRESS", self.queue, check_queue)
        _name("PROGRESS", self.durable, check_durable)
        _set(self, "offsets", _int_tuple("PROGRESS", "offsets", self.offsets))


@_frame
class Delete(Frame):
    """Client -> broker: delete durable ``durable`` of ``queue``, or with no durable the whole queue."""

    TYPE = FrameType.DELETE
    req: int
    queue: str
    durable: str | None = None

    def __post_init__(self) -> None:
        _uint("DELETE", "req", self.req)
        _name("DELETE", self.queue, check_queue)
        if self.durable is not None:
            _name("DELETE", self.durable, check_durable)


@_frame
class Seek(Frame):
    """Client -> broker: move durable ``durable`` of ``queue`` to a new start (rewind or skip ahead)."""

    TYPE = FrameType.SEEK
    req: int
    queue: str
    durable: str
    start: str = "earliest"
    start_value: int | None = None

    def __post_init__(self) -> None:
        _uint("SEEK", "req", self.req)
        _name("SEEK", self.queue, check_queue)
        _name("SEEK", self.durable, check_durable)
        _start("SEEK", self.start, self.start_value)


@_frame
class Fetch(Frame):
    """Client -> broker: pull up to ``max_messages``, waiting up to ``wait_ms``.

    With ``durable`` the messages are taken from that durable's cursor (and
    must be acked); without it this is a plain read of the log from
    ``start``/``start_value``, with nothing remembered.
    """

    TYPE = FrameType.FETCH
    req: int
    queue: str
    durable: str | None = None
    events: tuple[str, ...] = ()
    max_messages: int = 100
    wait_ms: int = 0
    start: str = "earliest"
    start_value: int | None = None
    ack_wait_ms: int = 0

    def __post_init__(self) -> None:
        f = "FETCH"
        _uint(f, "req", self.req)
        _name(f, self.queue, check_queue)
        if self.durable is not None:
            _name(f, self.durable, check_durable)
        if type(self.events) not in (list, tuple):
            _fail(f, "events must be an array")
        for e in self.events:
            _name(f, e, check_pattern)
        _set(self, "events", tuple(self.events))
        _uint(f, "max_messages", self.max_messages, 1 << 20)
        _uint(f, "wait_ms", self.wait_ms, 1 << 40)
        _start(f, self.start, self.start_value)
        _uint(f, "ack_wait_ms", self.ack_wait_ms, 1 << 40)


@dataclass(frozen=True, slots=True)
class Record:
    """One message inside a BATCH: wire form ``[offset, deliveries, event, timestamp, headers, payload]``."""

    offset: int
    deliveries: int
    event: str
    timestamp: int
    headers: dict[str, str] | None
    payload: Any


@_frame
class Batch(Frame):
    """Broker -> client: reply to FETCH. ``next_offset`` is where a plain read continues."""

    TYPE = FrameType.BATCH
    req: int
    next_offset: int
    records: tuple[Record, ...] = ()

    def __post_init__(self) -> None:
        _uint("BATCH", "req", self.req)
        _uint("BATCH", "next_offset", self.next_offset)
        if type(self.records) not in (list, tuple):
            _fail("BATCH", "records must be an array")
        out = []
        for r in self.records:
            if type(r) is Record:
                out.append(r)
                continue
            if not isinstance(r, list) or len(r) != 6:
                _fail("BATCH", "each record must be a 6-element array")
            rec = Record(*cast(list[Any], r))
            _uint("BATCH", "offset", rec.offset)
            _uint("BATCH", "deliveries", rec.deliveries)
            _uint("BATCH", "timestamp", rec.timestamp)
            if type(rec.event) is not str:
                _fail("BATCH", "event must be a string")
            _headers("BATCH", rec.headers)
            out.append(rec)
        _set(self, "records", tuple(out))

    def to_wire(self) -> list[Any]:
        """Return the wire list, records flattened to arrays."""
        return [
            int(self.TYPE),
            self.req,
            self.next_offset,
            [[r.offset, r.deliveries, r.event, r.timestamp, r.headers, r.payload] for r in self.records],
        ]


@_frame
class Status(Frame):
    """Client -> broker: ask for the broker's status.

    ``page`` continues a reply that did not fit in one frame: it is that
    reply's ``more`` value, sent back as is (SPEC.md section 6). Left out on
    the wire when nil (a 1-field STATUS, as before paging existed).
    """

    TYPE = FrameType.STATUS
    req: int
    page: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _uint("STATUS", "req", self.req)
        if self.page is not None and type(self.page) is not dict:
            _fail("STATUS", "page must be a map or nil")

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.req] if self.page is None else [self.TYPE, self.req, self.page]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Frame:
        """Accept the 1-field STATUS (no page)."""
        if len(items) == 2:
            items = [*items, None]
        return super(Status, cls).from_wire(items)  # noqa: UP008 (see Publish.from_wire)


@_frame
class StatusReply(Frame):
    """Broker -> client: server, connections, queues and durables (see SPEC.md)."""

    TYPE = FrameType.STATUS_REPLY
    req: int
    info: dict[str, Any]

    def __post_init__(self) -> None:
        _uint("STATUS_REPLY", "req", self.req)
        if type(self.info) is not dict:
            _fail("STATUS_REPLY", "info must be a map")


@_frame
class Ping(Frame):
    """Either side: are you there? Answered by PONG with the same req."""

    TYPE = FrameType.PING
    req: int

    def __post_init__(self) -> None:
        _uint("PING", "req", self.req)


@_frame
class Pong(Frame):
    """Either side: reply to PING."""

    TYPE = FrameType.PONG
    req: int

    def __post_init__(self) -> None:
        _uint("PONG", "req", self.req)


@_frame
class Ok(Frame):
    """Broker -> client: the request succeeded (SUBSCRIBE, UNSUBSCRIBE, ACK, NACK)."""

    TYPE = FrameType.OK
    req: int

    def __post_init__(self) -> None:
        _uint("OK", "req", self.req)


@_frame
class Err(Frame):
    """Broker -> client: the request (or, with req 0, the connection) failed."""

    TYPE = FrameType.ERR
    req: int
    code: int
    message: str

    def __post_init__(self) -> None:
        _uint("ERR", "req", self.req)
        _uint("ERR", "code", self.code, 1 << 16)
        if type(self.message) is not str:
            _fail("ERR", "message must be a string")


@_frame
class Bye(Frame):
    """Either side: I am closing; flush and close your end too."""

    TYPE = FrameType.BYE
    req: int = 0

    def __post_init__(self) -> None:
        _uint("BYE", "req", self.req)


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """Not a frame: the event a Connection yields for a well-formed request
    whose field values are unacceptable. The broker answers it with ERR."""

    req: int
    type: FrameType
    code: ErrorCode
    message: str


FRAME_CLASSES: Final[dict[int, type[Frame]]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, Publish, PubAck, Subscribe, Unsubscribe, Deliver, Ack, Nack,
        Fetch, Batch, Status, StatusReply, Ping, Pong, Ok, Err, Bye, Progress, Delete, Seek,
    )
}  # fmt: skip
