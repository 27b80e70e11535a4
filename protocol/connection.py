"""The sans-I/O connection: bytes in, frames out; frames in, bytes out.

    conn = Connection(Role.CLIENT, limits=Limits())
    wire = conn.send(Hello(req=1, version=PROTOCOL_VERSION, name="api"))
    conn.receive_data(chunk)            # b"" means EOF
    for event in conn.events():          # Welcome, Deliver, Err, ... or nothing yet
        ...

State machine
-------------
One state per connection, moved by frames in either direction. The whole
machine is the table ``_TRANSITIONS[(role, state, direction, frame type)]``;
a missing key is a protocol error and the state becomes ERROR for good.

Rule 1: the client speaks first. Its first frame is HELLO; until the broker
        answers WELCOME nothing else may be sent either way (except ERR or BYE,
        which end the handshake).
Rule 2: in READY each side sends only its own frame types: requests from the
        client, replies and deliveries from the broker. PING, PONG and BYE go
        both ways.
Rule 3: BYE from either side moves to CLOSING: the sender sends nothing more
        but still reads (pending replies may still arrive); EOF or the peer's
        BYE ends it. The receiver of a BYE decodes nothing after it (the
        peer promised there is nothing), so whatever the peer sent before its
        BYE is answered in CLOSING and the state goes no further.
Rule 4: an ERR is allowed in any live state (a broker at its connection
        limit sends one before the client's HELLO). Whether it ends the
        connection depends on its code (``protocol.errors.FATAL_CODES``); the
        I/O layer closes the socket, this object only records what was said.

The broker reads with :meth:`Connection.events_spliced`, the same
decoding except that a plain PUBLISH (no headers or message_id) to names
seen before comes out as a :data:`SplicedPublish` tuple holding the
payload's encoding (a ``bin`` payload's bytes as sent, undecoded), for the
broker to copy into its record.

Errors: a frame we may not send raises :class:`LocalProtocolError` (our bug;
state unchanged). A frame the peer may not send, or bytes that are not a
frame, raise :class:`RemoteProtocolError` from :meth:`events`, which refuses
everything after it (``failed``). The frames that arrived before the bad
bytes are in the error's ``before``: the caller handles them, replies
included (a PING sent just before a bad frame still gets its PONG), then
sends the ERR with :meth:`send_error`, which moves the connection to ERROR,
and closes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError, local_error
from .framing import FLAT_TYPES, HEADER, FrameDecoder, find_bad_map_key, pack_body, unpack_body
from .messages import FRAME_CLASSES, Bye, Frame, FrameType, InvalidRequest, Publish
from .wire import PUBACK_FRAME_SIZE, PubAckRun, decode_fixed_puback, locate_plain_publish, puback_run_length

__all__ = ["Connection", "Event", "Limits", "Role", "SplicedPublish", "State", "encode_error"]

#: 1 MiB: NATS's max_payload default; large enough for any reasonable event,
#: small enough that a hostile length prefix costs little.
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
#: Before the handshake completes only HELLO is legal, and it is small: cap
#: frames at 8 KiB so unauthenticated peers cannot pin memory (RabbitMQ does the same).
DEFAULT_HANDSHAKE_FRAME_SIZE: Final = 8 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Protocol limits shared by broker and client.

    Attributes:
        max_frame_size: largest frame body in bytes after the handshake.
        handshake_frame_size: largest frame body before it.
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_frame_size: int = DEFAULT_HANDSHAKE_FRAME_SIZE

    def __post_init__(self) -> None:
        if self.max_frame_size < 64 or self.max_frame_size > (1 << 31):
            raise ValueError(f"max_frame_size must be in 64..2^31, not {self.max_frame_size}")
        if not 64 <= self.handshake_frame_size <= self.max_frame_size:
            raise ValueError("handshake_frame_size must be in 64..max_frame_size")


class Role(enum.Enum):
    """Which end of the connection this object is."""

    CLIENT = "client"
    BROKER = "broker"


class State(enum.Enum):
    """Connection states (see the module docstring's rules)."""

    HANDSHAKE = "handshake"  # before HELLO (client: not sent; broker: not received)
    GREETING = "greeting"  # HELLO passed, WELCOME not yet
    READY = "ready"
    CLOSING = "closing"  # BYE sent or received
    CLOSED = "closed"
    ERROR = "error"


Event = Frame | InvalidRequest | PubAckRun
#: A plain PUBLISH from :meth:`Connection.events_spliced`: ``(req, queue,
#: event, payload)`` where ``event`` and ``payload`` are the event name and
#: the payload packed as :func:`protocol.wire.encode_record` writes them (a
#: bin payload's bytes as sent: one well-formed msgpack value). The record
#: body is ``event + pack(timestamp) + b"\xc0" + payload``.
SplicedPublish = tuple[int, str, bytes, bytes]
#: Byte strings of queue + event a connection remembers for events_spliced;
#: a publisher uses a handful, and past this many they are forgotten at once.
_PLAIN_NAMES_MAX: Final = 256

_pack_len: Final = HEADER.pack
_PUBLISH: Final = int(FrameType.PUBLISH)


def encode_error(req: int, code: ErrorCode, message: str) -> bytes:
    """Encode an ERR frame (length prefix included); the message is cut at 1,024 characters."""
    body = pack_body([int(FrameType.ERR), req, int(code), message[:1024]])
    return HEADER.pack(len(body)) + body


def _unencodable(frame_type: FrameType, exc: Exception) -> LocalProtocolError:
    """A frame holding a value msgpack cannot encode (a payload, mostly)."""
    return LocalProtocolError(f"{frame_type.name} frame cannot be encoded as msgpack: {exc}")


def _undecodable(payload: Any, exc: RemoteProtocolError) -> LocalProtocolError:
    """A PUBLISH that msgpack encoded but the peer's decoder refuses.

    The packer writes what :func:`protocol.framing.unpack_body` refuses, as
    MALFORMED_FRAME, which ends the connection: a map with an int key, say,
    or an ``ExtType``. So a payload that is not flat is decoded before it is
    sent (:meth:`Connection.encode`, :meth:`Connection.send_publish`): exact,
    and in C it costs about what packing did. (A walk of the payload in
    Python is a little cheaper for a dict of one or two items, dearer for
    anything larger, and would miss what is not a map key.)
    """
    where = find_bad_map_key(payload)
    why = f"map keys must be strings (or bytes): {where}" if where is not None else f"the peer would refuse it: {exc}"
    return LocalProtocolError(f"PUBLISH frame cannot be sent: {why}")


_SEND, _RECV = "send", "recv"
_T = FrameType
_CLIENT_REQUESTS = (
    _T.PUBLISH, _T.SUBSCRIBE, _T.UNSUBSCRIBE, _T.ACK, _T.NACK, _T.PROGRESS, _T.DELETE, _T.SEEK, _T.FETCH, _T.STATUS,
)  # fmt: skip
_BROKER_REPLIES = (_T.PUBACK, _T.DELIVER, _T.BATCH, _T.STATUS_REPLY, _T.OK)
_BOTH_WAYS = (_T.PING, _T.PONG)


def _build_table() -> dict[tuple[Role, State, str, FrameType], State]:
    t: dict[tuple[Role, State, str, FrameType], State] = {}
    # The client's view; the broker's is the mirror (send <-> recv).
    client: dict[tuple[State, str, FrameType], State] = {}
    hs, gr, rd, cl = State.HANDSHAKE, State.GREETING, State.READY, State.CLOSING
    client[(hs, _SEND, _T.HELLO)] = gr  # Rule 1
    client[(gr, _RECV, _T.WELCOME)] = rd
    for st in (hs, gr, rd):
        client[(st, _RECV, _T.ERR)] = st  # Rule 4
        client[(st, _SEND, _T.BYE)] = cl  # Rule 3
        client[(st, _RECV, _T.BYE)] = cl
    for ft in _CLIENT_REQUESTS:
        client[(rd, _SEND, ft)] = rd  # Rule 2
    for ft in _BROKER_REPLIES:
        client[(rd, _RECV, ft)] = rd
        client[(cl, _RECV, ft)] = cl  # replies still drain while closing
    for ft in _BOTH_WAYS:
        client[(rd, _SEND, ft)] = rd
        client[(rd, _RECV, ft)] = rd
    client[(cl, _RECV, _T.ERR)] = cl
    client[(cl, _RECV, _T.BYE)] = State.CLOSED
    client[(cl, _RECV, _T.PING)] = cl
    client[(cl, _RECV, _T.PONG)] = cl  # the answer to a PING sent before our BYE is a reply too
    client[(cl, _RECV, _T.WELCOME)] = cl  # and so is the answer to a HELLO sent right before it
    for (st, direction, ft), nxt in client.items():
        t[(Role.CLIENT, st, direction, ft)] = nxt
        # Mirror for the broker; it *sends* ERR where the client receives one.
        t[(Role.BROKER, st, _RECV if direction == _SEND else _SEND, ft)] = nxt
    # The broker may send ERR and BYE while closing (e.g. a shutdown notice).
    t[(Role.BROKER, cl, _SEND, _T.ERR)] = cl
    t[(Role.BROKER, cl, _RECV, _T.BYE)] = State.CLOSED
    t[(Role.CLIENT, cl, _SEND, _T.BYE)] = cl
    return t


_TRANSITIONS: Final = _build_table()

# The same table split per (role, state) and keyed by (direction, int type):
# _move() then hashes a (str, int) tuple instead of two plain Enums, which
# hash in Python code. Values are (next state, its sub-table).
_Sub = dict[tuple[str, int], tuple[State, "_Sub"]]
_BY_STATE: Final[dict[tuple[Role, State], _Sub]] = {(r, s): {} for r in Role for s in State}
for (_role, _state, _dir, _ft), _next in _TRANSITIONS.items():
    _BY_STATE[(_role, _state)][(_dir, int(_ft))] = (_next, _BY_STATE[(_role, _next)])
#: The sub-table of the client's usual state, where a PUBACK changes nothing.
_CLIENT_READY: Final = _BY_STATE[(Role.CLIENT, State.READY)]
#: The broker's: a PUBLISH changes nothing there either.
_BROKER_READY: Final = _BY_STATE[(Role.BROKER, State.READY)]


class Connection:
    """One end of a tidings connection, with no I/O of its own.

    Args:
        role: which end this is.
        limits: frame size limits.
        puback_runs: (client) :meth:`events` returns consecutive PUBACKs in
            the broker's fixed-width layout as one :class:`PubAckRun`.
    """

    __slots__ = (
        "_chunks", "_decoder", "_peer_bye", "_plain_names", "_runs", "_table", "eof", "failed", "limits",
        "max_frame_size", "role", "state",
    )  # fmt: skip

    def __init__(self, role: Role, *, limits: Limits | None = None, puback_runs: bool = False) -> None:
        self.role = role
        self._runs = puback_runs and role is Role.CLIENT
        self.limits = limits or Limits()
        self.state = State.HANDSHAKE
        self._table = _BY_STATE[(role, State.HANDSHAKE)]
        #: Frame limit once READY; the client adopts the broker's from WELCOME.
        self.max_frame_size = self.limits.max_frame_size
        # Only the broker guards the handshake with the small limit: it is the
        # side that unauthenticated strangers can reach.
        self._decoder = FrameDecoder(self.limits.handshake_frame_size if role is Role.BROKER else self.max_frame_size)
        self._chunks: list[bytes] = []
        self.eof = False
        #: The peer's protocol violation, once :meth:`events` has raised it.
        self.failed: RemoteProtocolError | None = None
        #: events_spliced's names: queue + event as sent -> (queue, packed event).
        self._plain_names: dict[bytes, tuple[str, bytes]] = {}
        #: The peer sent BYE: what it sends after that is not read (Rule 3).
        self._peer_bye = False

    def __repr__(self) -> str:
        return (
            f"<Connection {self.role.value} {self.state.value} "
            f"buffered={self._decoder.buffered + sum(map(len, self._chunks))}>"
        )

    # --- sending ------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Check that ``frame`` may be sent now, update the state, and encode it.

        Legal in: the states the transition table allows for this role and
        frame type (see the module docstring).

        Returns:
            The bytes to write (length prefix included).

        Raises:
            LocalProtocolError: the frame is not allowed in this state, is
                larger than the frame limit (a PUBLISH: LocalPayloadTooLarge),
                or holds a value msgpack cannot encode.
        """
        data = self.encode(frame)
        self._move(_SEND, frame.TYPE)
        return data

    def encode(self, frame: Frame) -> bytes:
        """Encode ``frame`` with its length prefix, checking only its size: no state change.

        Legal in: every state (the client uses it to check a request it will
        send once a new connection is ready).

        Raises:
            LocalProtocolError: larger than the frame limit, a value msgpack
                cannot encode, or a PUBLISH payload the peer's decoder would
                refuse (a map key other than a string or bytes, an ExtType).
        """
        try:
            body = pack_body(frame.to_wire())
        except (TypeError, ValueError, OverflowError) as exc:
            raise _unencodable(frame.TYPE, exc) from exc
        if len(body) > self.max_frame_size:
            raise self._too_large(frame.TYPE, len(body))
        if type(frame) is Publish and type(frame.payload) not in FLAT_TYPES:
            try:
                unpack_body(body, self.max_frame_size)
            except RemoteProtocolError as exc:
                raise _undecodable(frame.payload, exc) from exc.__cause__
        return _pack_len(len(body)) + body

    def send_again(self, data: bytes, frame_type: FrameType) -> bytes:
        """Check that ``data``, a ``frame_type`` frame encoded earlier (length
        prefix included, perhaps for an earlier connection), may be sent now.

        Legal in: as :meth:`send` for ``frame_type``.

        Returns:
            ``data``.

        Raises:
            LocalProtocolError: not allowed in this state, or larger than this
                connection's frame limit.
        """
        if len(data) - HEADER.size > self.max_frame_size:
            raise self._too_large(frame_type, len(data) - HEADER.size)
        self._move(_SEND, frame_type)
        return data

    def send_publish(self, req: int, queue: str, event: str, payload: Any, message_id: str | None = None) -> bytes:
        """``send(Publish(req, queue, event, payload, None, message_id))`` without the frame object.

        The client's hot path: the caller vouches that the names are valid
        (it checked them once through :class:`Publish`) and that ``req`` and
        ``message_id`` are well-typed. The wire list is packed directly;
        outside READY the general path decides (and words the error).

        Legal in: READY (client role).

        Returns:
            The bytes to write (length prefix included).

        Raises:
            LocalProtocolError: not allowed in this state, larger than the
                frame limit, a payload msgpack cannot encode, or one the
                peer's decoder would refuse (as :meth:`encode`).
        """
        if self._table is not _CLIENT_READY:  # not a READY client
            return self.send(Publish(req, queue, event, payload, None, message_id))
        # READY -> READY: nothing for _move() to change.
        try:
            body = pack_body([_PUBLISH, req, queue, event, payload, None, message_id])
        except (TypeError, ValueError, OverflowError) as exc:
            raise _unencodable(FrameType.PUBLISH, exc) from exc
        if len(body) > self.max_frame_size:
            raise self._too_large(FrameType.PUBLISH, len(body))
        if type(payload) not in FLAT_TYPES:  # (a flat payload costs this set lookup only)
            try:
                unpack_body(body, self.max_frame_size)  # see _undecodable
            except RemoteProtocolError as exc:
                raise _undecodable(payload, exc) from exc.__cause__
        return _pack_len(len(body)) + body

    def _too_large(self, frame_type: FrameType, size: int) -> LocalProtocolError:
        if frame_type is FrameType.PUBLISH:  # the message is too large: what the broker calls it too
            return local_error(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"message of {size} bytes (its PUBLISH frame) exceeds the frame limit of {self.max_frame_size} bytes",
            )
        return LocalProtocolError(
            f"{frame_type.name} frame of {size} bytes exceeds the limit of {self.max_frame_size} bytes",
            code=ErrorCode.FRAME_TOO_LARGE,
        )

    def send_error(self, req: int, code: ErrorCode, message: str) -> bytes:
        """Encode an ERR frame. Legal in every state, ERROR included, so a
        fatal error can always be explained before the socket closes. The ERR
        that reports the peer's violation (``failed``: req 0, its code) moves
        to ERROR: nothing but ERR after it.

        Returns:
            The bytes to write.
        """
        if self.failed is not None and req == 0 and code is self.failed.code:
            self._set_state(State.ERROR)
        return encode_error(req, code, message)

    def check_send(self, frame_type: FrameType) -> None:
        """Account for a frame encoded elsewhere (the DELIVER/BATCH fast path).

        Legal in: READY (broker role) for DELIVER and BATCH.

        Raises:
            LocalProtocolError: the frame is not allowed in this state.
        """
        self._move(_SEND, frame_type)

    # --- receiving ----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` marks EOF. Never raises."""
        if data:
            self._chunks.append(data)
        else:
            self.eof = True

    def events(self) -> list[Event]:
        """Decode every complete frame buffered so far.

        Returns:
            Frames (and InvalidRequest events; with ``puback_runs``,
            PubAckRuns) in arrival order; empty when no frame is complete yet.

        Raises:
            RemoteProtocolError: bytes that are not a legal frame here. Its
                ``before`` holds the events decoded before them: handle those
                (their replies may still be sent), then send
                ``send_error(0, exc.code, str(exc))``, which moves to ERROR,
                and close. It is kept in ``failed``; later calls raise.
        """
        out, bodies, error = self._bodies()
        decode = self._decode
        try:
            for body in bodies:
                event = decode(body)
                out.append(event)
                if type(event) is Bye:
                    self._after_bye()
                    error = None  # (a framing error after the BYE is not the peer's to answer for)
                    break
        except RemoteProtocolError as exc:
            error = exc
        if error is not None:
            self._fail(error, out)
        return out

    def events_spliced(self) -> list[Event | SplicedPublish]:
        """:meth:`events`, but a plain PUBLISH comes out as a :data:`SplicedPublish`.

        The broker's hot path. A plain PUBLISH (see
        :func:`protocol.wire.locate_plain_publish`: no headers or message_id)
        whose queue and event are *exactly the bytes* of names that passed the
        general path earlier on this connection makes no Publish object: the
        tuple carries the event's encoding and the payload's, ready to be
        spliced into a record body (see SplicedPublish). A ``bin`` payload is
        not even decoded: its bytes are taken as sent; any other payload is
        decoded (the check that it is valid msgpack) and encoded again.
        Every other frame, including a plain PUBLISH with names not seen yet,
        takes the general path, which checks the names (the caches of
        :mod:`protocol.frame`, then the rules) and words any error; a plain
        PUBLISH it accepts teaches this connection its names' bytes. So the
        result is what :meth:`events` would return, in another form: the
        tests compare the two.

        Legal in: every state; only READY has plain PUBLISHes (broker role).

        Raises:
            RemoteProtocolError: as :meth:`events` (``before`` in this form).
        """
        out: list[Event | SplicedPublish]
        out, bodies, error = self._bodies()  # type: ignore[assignment]
        decode = self._decode
        known = self._plain_names
        try:
            for body in bodies:
                at = locate_plain_publish(body) if self._table is _BROKER_READY else None
                if at is None:
                    event = decode(body)
                    out.append(event)
                    if type(event) is Bye:
                        self._after_bye()
                        error = None
                        break
                    continue
                req, start, payload, whole = at
                names = body[start:payload]
                hit = known.get(names)
                if hit is not None:
                    if whole:
                        out.append((req, hit[0], hit[1], body[payload:-2]))
                        continue
                    # Any other payload is decoded, by the general path's call (so
                    # it raises what that would), and encoded as encode_record
                    # would: inside a tuple, so that msgpack's nesting limit
                    # counts alike. Whatever does not fit takes the general path.
                    items = unpack_body(body, self.max_frame_size)
                    if items[5] is None and items[6] is None:
                        try:
                            packed = pack_body((items[4],))[1:]  # drop the fixarray(1) byte
                        except (TypeError, ValueError, OverflowError):
                            pass
                        else:
                            out.append((req, hit[0], hit[1], packed))
                            continue
                event = decode(body)
                if type(event) is Publish:  # the general path took these names
                    if len(known) >= _PLAIN_NAMES_MAX:
                        known.clear()
                    known[names] = (event.queue, pack_body(event.event))
                out.append(event)
        except RemoteProtocolError as exc:
            error = exc
        if error is not None:
            self._fail(error, out)
        return out

    def _after_bye(self) -> None:
        """The peer's BYE was decoded: drop what it sent after it, and all it sends later."""
        self._peer_bye = True
        self._chunks.clear()

    def _bodies(self) -> tuple[list[Event], list[bytes], RemoteProtocolError | None]:
        """The start of :meth:`events`: a client's PUBACK run, the complete frame
        bodies buffered so far, and the framing's error after them, if any."""
        if self.state is State.ERROR or self.failed is not None:
            raise RemoteProtocolError("connection already failed", code=ErrorCode.UNEXPECTED_FRAME)
        out: list[Event] = []
        chunks = self._chunks
        if self._peer_bye:
            chunks.clear()
            return out, [], None
        if not chunks:
            return out, [], None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._runs and self._table is _CLIENT_READY:  # a READY client stays READY on PUBACKs
            decoder = self._decoder
            if 0 < decoder.buffered < PUBACK_FRAME_SIZE:  # the start of a frame, maybe a PUBACK
                data = decoder.take() + data
            if not decoder.buffered:  # data starts at a frame boundary
                n = puback_run_length(data)
                if n:
                    cut = n * PUBACK_FRAME_SIZE
                    out.append(PubAckRun(data[:cut]))
                    data = data[cut:]
        try:
            return out, self._decoder.feed(data), None
        except RemoteProtocolError as exc:
            return out, exc.before, exc  # the bodies before the bad header: decode them, then fail

    def _fail(self, error: RemoteProtocolError, before: list[Any]) -> NoReturn:
        """Raise the peer's violation with what came before it; nothing more is read."""
        error.before = before
        self.failed = error
        raise error

    def _decode(self, body: bytes) -> Event:
        if len(body) == 21:  # maybe a fixed-width PUBACK: the client's most frequent frame
            ack = decode_fixed_puback(body)
            if ack is not None:
                if self._table is not _CLIENT_READY:  # a READY client stays READY
                    self._move(_RECV, FrameType.PUBACK)
                return ack
        items = unpack_body(body, self.max_frame_size)
        if type(items) is not list or not items or type(items[0]) is not int:
            raise RemoteProtocolError(
                "a frame must be an array whose first element is the frame type",
                code=ErrorCode.MALFORMED_FRAME,
            )
        cls = FRAME_CLASSES.get(items[0])
        if cls is None:
            raise RemoteProtocolError(f"unknown frame type {items[0]}", code=ErrorCode.MALFORMED_FRAME)
        self._move(_RECV, cls.TYPE)
        try:
            return cls.from_wire(items)
        except LocalProtocolError as exc:
            req = items[1] if len(items) > 1 and type(items[1]) is int else None
            if exc.code is ErrorCode.MALFORMED_FRAME or req is None or req < 0:
                raise RemoteProtocolError(str(exc), code=ErrorCode.MALFORMED_FRAME) from exc
            return InvalidRequest(req, cls.TYPE, exc.code, str(exc))

    # --- the state machine --------------------------------------------------

    def _move(self, direction: str, frame_type: FrameType) -> None:
        entry = self._table.get((direction, frame_type))
        if entry is None:
            what = f"{frame_type.name} in state {self.state.name}"
            if direction == _SEND:
                raise LocalProtocolError(f"cannot send {what}", code=ErrorCode.UNEXPECTED_FRAME)
            raise RemoteProtocolError(f"unexpected {what}", code=ErrorCode.UNEXPECTED_FRAME)
        nxt, self._table = entry
        if nxt is not self.state:
            self.state = nxt
            if nxt is State.READY:
                # Broker: WELCOME sent, the peer is authenticated: lift the small limit.
                self._decoder.max_frame_size = self.max_frame_size

    def _set_state(self, state: State) -> None:
        self.state = state
        self._table = _BY_STATE[(self.role, state)]

    def adopt_max_frame_size(self, size: int) -> None:
        """Client side: use the frame limit the broker announced in WELCOME.

        Args:
            size: ``Welcome.max_frame_size``.
        """
        self.max_frame_size = size
        self._decoder.max_frame_size = size
