"""The one exception hierarchy of tidings, and the wire error codes.

Both the broker and the client raise only subclasses of :class:`TidingsError`.
The tree (see STYLE.md):

    TidingsError
    ├── ProtocolError                 abstract: a frame broke the protocol
    │   ├── LocalProtocolError        *we* tried to send something illegal (a caller bug)
    │   └── RemoteProtocolError       the peer sent garbage; ``.code`` goes in our ERR frame
    ├── ConnectionClosed              we closed the connection ourselves
    ├── ConnectionLost                the peer or the OS broke it (also a ``ConnectionError``)
    ├── ServerError                   an ERR frame from the broker; one subclass per code
    ├── SlowConsumer                  a subscriber fell too far behind
    ├── RequestTimeout                no reply in time (also a ``TimeoutError``)
    └── ConfigError                   a bad option (also a ``ValueError``)

Our own checks find some refusals before anything is sent: a bad name, a
bad field value, a message over the frame limit. Those raise a
LocalProtocolError that is *also* the ServerError subclass of the code the
broker would answer (``LocalInvalidName`` is a LocalProtocolError and an
InvalidName; likewise ``LocalBadRequest``, ``LocalPayloadTooLarge``), so
``except InvalidName`` handles the refusal wherever it was found, and
``except LocalProtocolError`` still tells that nothing was sent.
:func:`local_error` picks the class.

Wire codes are stable numbers (never renumber one; add new ones at the end of
their block). A code is *fatal* when the sender closes the connection right
after the ERR frame, and *retriable* when the same request may succeed later
without change (the client's reconnect logic uses this flag).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Final

__all__ = [
    "AuthFailed",
    "BadRequest",
    "ConfigError",
    "ConnectionClosed",
    "ConnectionLost",
    "ErrorCode",
    "InvalidName",
    "LocalBadRequest",
    "LocalInvalidName",
    "LocalPayloadTooLarge",
    "LocalProtocolError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestTimeout",
    "ServerError",
    "ShuttingDown",
    "SlowConsumer",
    "StorageFull",
    "TidingsError",
    "TooManyConnections",
]


class ErrorCode(enum.IntEnum):
    """Stable error codes carried by ERR frames (see protocol/SPEC.md)."""

    # 1-19: connection-level; the sender closes the connection after the ERR frame.
    MALFORMED_FRAME = 1  # not msgpack, wrong shape or field types
    FRAME_TOO_LARGE = 2  # length prefix over the negotiated maximum
    UNEXPECTED_FRAME = 3  # frame type not allowed in the connection's state
    UNSUPPORTED_VERSION = 4
    AUTH_FAILED = 5
    HANDSHAKE_TIMEOUT = 6
    TOO_MANY_CONNECTIONS = 7
    SLOW_CONSUMER = 8  # output buffer over its cap for too long
    SHUTTING_DOWN = 9  # broker is stopping; reconnect later
    HEARTBEAT_TIMEOUT = 10
    PERMISSIONS_CHANGED = 11  # the user's rights were narrowed by a reload; reconnect
    # 20-39: request-level; the connection stays open.
    BAD_REQUEST = 20  # a field has a value the broker cannot accept
    INVALID_NAME = 21  # queue, event or durable name outside the allowed set
    PAYLOAD_TOO_LARGE = 22
    UNKNOWN_SUBSCRIPTION = 23
    DUPLICATE_SUBSCRIPTION = 24
    NOT_FOUND = 25  # unknown queue or durable
    BAD_ACK = 26  # ack/nack of an offset that is not in flight
    PERMISSION_DENIED = 27
    CONFLICT = 28  # in use (a durable re-subscribed with other settings...), or being deleted
    # 40-59: storage.
    STORAGE_FULL = 40  # disk full: retriable once space returns
    STORAGE_FAILED = 41  # I/O error; the broker stops confirming
    QUEUE_CORRUPT = 42  # the queue's log failed its checks at start-up
    # 60+: everything else.
    INTERNAL = 60


#: Codes after which the sender closes the connection.
FATAL_CODES: Final = frozenset(c for c in ErrorCode if c < 20)
#: Codes for which retrying the same request later may succeed.
RETRIABLE_CODES: Final = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.STORAGE_FULL, ErrorCode.TOO_MANY_CONNECTIONS})


class TidingsError(Exception):
    """Root of every exception tidings raises."""


class ProtocolError(TidingsError):
    """A frame broke the protocol. Abstract: raise a subclass.

    Attributes:
        code: the wire code that describes the violation.
    """

    code: ErrorCode

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise Local- or RemoteProtocolError")
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids: a bug in the caller.

    Nothing was sent. For a refusal the broker would answer with a
    request-level code, the error is also that code's ServerError subclass
    (see the module docstring and :func:`local_error`).
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; ``code`` goes into our ERR frame.

    Attributes:
        before: what arrived before the violation, valid and in order: frame
            bodies from :class:`FrameDecoder`, events from
            :meth:`Connection.events`. Handle them before closing (a request
            sent before a bad frame still gets its answer).
    """

    def __init__(
        self, message: str, *, code: ErrorCode = ErrorCode.MALFORMED_FRAME, before: list[Any] | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.before: list[Any] = before if before is not None else []


class ConnectionClosed(TidingsError):
    """The connection was closed by us (``aclose()``/``abort()``) and cannot be used."""

    def __init__(self, message: str = "connection is closed") -> None:
        super().__init__(message)


class ConnectionLost(TidingsError, ConnectionError):
    """The peer or the network broke the connection; ``__cause__`` holds the OSError."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__(message)


class SlowConsumer(TidingsError):
    """A subscriber's pending buffer passed its limit.

    Attributes:
        pending_msgs: messages waiting when the limit was hit.
        pending_bytes: bytes waiting when the limit was hit.
    """

    def __init__(self, pending_msgs: int, pending_bytes: int) -> None:
        super().__init__(f"slow consumer: {pending_msgs} messages / {pending_bytes} bytes pending")
        self.pending_msgs = pending_msgs
        self.pending_bytes = pending_bytes


class RequestTimeout(TidingsError, TimeoutError):
    """No reply arrived within the request's timeout."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what}: no reply within {timeout:g} s")
        self.timeout = timeout


class ConfigError(TidingsError, ValueError):
    """An option or configuration value is invalid."""


class ServerError(TidingsError):
    """An ERR frame from the broker.

    ``ServerError.for_code(code)`` picks the subclass registered for a code, so
    callers can ``except StorageFull`` rather than compare numbers.

    Attributes:
        code: the wire code (an :class:`ErrorCode` when known, else the raw int).
        message: the broker's human-readable explanation.
        retriable: whether the same request may succeed later.
        fatal: whether the broker closes the connection after this error.
    """

    codes: ClassVar[tuple[ErrorCode, ...]] = ()
    _registry: ClassVar[dict[int, type[ServerError]]] = {}

    def __init__(self, code: int, message: str) -> None:
        try:
            known: ErrorCode | int = ErrorCode(code)
        except ValueError:
            known = code
        name = known.name if isinstance(known, ErrorCode) else str(code)
        super().__init__(f"{name}: {message}")
        self.code = known
        self.message = message
        self.retriable = known in RETRIABLE_CODES
        self.fatal = known in FATAL_CODES

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for code in cls.__dict__.get("codes", ()):  # its own codes: the Local* classes inherit theirs
            ServerError._registry[int(code)] = cls

    @staticmethod
    def for_code(code: int, message: str) -> ServerError:
        """Build the most specific ServerError for a wire code.

        Args:
            code: the code from an ERR frame.
            message: the ERR frame's message.

        Returns:
            An instance of the registered subclass, or plain ServerError.
        """
        return ServerError._registry.get(code, ServerError)(code, message)


class AuthFailed(ServerError):
    """The broker refused our credentials."""

    codes = (ErrorCode.AUTH_FAILED,)


class BadRequest(ServerError):
    """The broker could not accept a field of the request."""

    codes = (ErrorCode.BAD_REQUEST, ErrorCode.BAD_ACK, ErrorCode.CONFLICT)


class InvalidName(ServerError):
    """A queue, event or durable name is outside the allowed set."""

    codes = (ErrorCode.INVALID_NAME,)


class PayloadTooLarge(ServerError):
    """A message is larger than the broker accepts."""

    codes = (ErrorCode.PAYLOAD_TOO_LARGE,)


class NotFound(ServerError):
    """The queue, durable or subscription named in the request does not exist."""

    codes = (ErrorCode.NOT_FOUND, ErrorCode.UNKNOWN_SUBSCRIPTION)


class PermissionDenied(ServerError):
    """The broker's users file does not allow this user that request on that queue."""

    codes = (ErrorCode.PERMISSION_DENIED,)


class StorageFull(ServerError):
    """The broker's disk is full; retry once space is freed."""

    codes = (ErrorCode.STORAGE_FULL,)


class ShuttingDown(ServerError):
    """The broker is stopping."""

    codes = (ErrorCode.SHUTTING_DOWN,)


class TooManyConnections(ServerError):
    """The broker is at its connection limit (``--max-connections``): it said so
    as soon as it accepted the connection, before or after our HELLO. Retriable:
    connect again later."""

    codes = (ErrorCode.TOO_MANY_CONNECTIONS,)


# --- refusals found by our own checks ----------------------------------------


class _LocalRefusal(LocalProtocolError, ServerError):
    """A refusal found before sending: a LocalProtocolError (nothing was sent)
    and the ServerError of the code the broker would have answered. Registers
    no code: ``ServerError.for_code`` builds the broker's."""

    code: ErrorCode

    def __init__(self, message: str, *, code: ErrorCode) -> None:
        # Neither parent's __init__: they take other arguments. What both set, set here.
        TidingsError.__init__(self, message)
        self.code = code
        self.message = message
        self.retriable = False
        self.fatal = False


class LocalInvalidName(_LocalRefusal, InvalidName):
    """A queue, event or durable name our own check refused (INVALID_NAME)."""


class LocalBadRequest(_LocalRefusal, BadRequest):
    """A field value our own check refused (BAD_REQUEST)."""


class LocalPayloadTooLarge(_LocalRefusal, PayloadTooLarge):
    """A PUBLISH larger than the broker's frame limit (PAYLOAD_TOO_LARGE), refused before sending."""


_LOCAL_REFUSALS: Final[dict[ErrorCode, type[LocalProtocolError]]] = {
    ErrorCode.INVALID_NAME: LocalInvalidName,
    ErrorCode.BAD_REQUEST: LocalBadRequest,
    ErrorCode.PAYLOAD_TOO_LARGE: LocalPayloadTooLarge,
}


def local_error(code: ErrorCode, message: str) -> LocalProtocolError:
    """The error for a check of ours that failed with ``code``.

    Args:
        code: what the broker would answer (INVALID_NAME, BAD_REQUEST,
            PAYLOAD_TOO_LARGE), or another code (MALFORMED_FRAME, ...).
        message: why.

    Returns:
        A LocalInvalidName, LocalBadRequest or LocalPayloadTooLarge for those
        three codes, else a plain LocalProtocolError.
    """
    return _LOCAL_REFUSALS.get(code, LocalProtocolError)(message, code=code)
