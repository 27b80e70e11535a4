"""What a frame is: its type tag, the :class:`Frame` base, the decorator that
makes a frame class, and the field checks every frame's ``__post_init__`` runs.

The frames themselves are in :mod:`protocol.messages`. The checks raise
``LocalProtocolError`` with MALFORMED_FRAME for a field of the wrong type or
shape, and with a request error code for a well-typed field with a bad value:
``LocalInvalidName`` (INVALID_NAME) or ``LocalBadRequest`` (BAD_REQUEST),
which are also the broker's ``InvalidName`` and ``BadRequest``, so a caller
catches one class whichever side refused. The receiving Connection turns
the latter into an ``InvalidRequest`` event.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, NoReturn, TypeVar, dataclass_transform

from .errors import ErrorCode, local_error

__all__ = ["START_KINDS", "Frame", "FrameType"]

#: How a subscription or fetch chooses its first message (see Subscribe).
START_KINDS: Final = ("new", "earliest", "offset", "time")
_MAX_U64: Final = (1 << 64) - 1


class FrameType(enum.IntEnum):
    """The type tag: element 0 of every frame's msgpack array."""

    HELLO = 1
    WELCOME = 2
    PUBLISH = 3
    PUBACK = 4
    SUBSCRIBE = 6
    UNSUBSCRIBE = 7
    DELIVER = 8
    ACK = 9
    NACK = 10
    FETCH = 11
    BATCH = 12
    STATUS = 13
    STATUS_REPLY = 14
    PING = 15
    PONG = 16
    OK = 17
    ERR = 18
    BYE = 19
    PROGRESS = 20
    DELETE = 21
    SEEK = 22


# --- field checks -----------------------------------------------------------
# Each raises LocalProtocolError; the receiving side converts it (see module doc).


def _fail(frame: str, message: str, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> NoReturn:
    """A field failed validation; ``code`` says whether it was its shape or its value."""
    raise local_error(code, f"{frame}: {message}")


def _uint(frame: str, name: str, value: object, maximum: int = _MAX_U64) -> None:
    if type(value) is not int:
        _fail(frame, f"{name} must be an integer, not {type(value).__name__}")
    elif not 0 <= value <= maximum:
        _fail(frame, f"{name} must be in 0..{maximum}, not {value}", ErrorCode.BAD_REQUEST)


def _opt_str(frame: str, name: str, value: object) -> None:
    if value is not None and type(value) is not str:
        _fail(frame, f"{name} must be a string or nil, not {type(value).__name__}")


# Names already found valid, per checker: a set lookup instead of a regex
# match for the few queue and event names a broker sees over and over.
_VALID: Final[dict[Any, set[str]]] = {}
_VALID_MAX: Final = 4096


def _name(frame: str, value: object, check: Any) -> None:
    if type(value) is not str:
        _fail(frame, f"name must be a string, not {type(value).__name__}")
    known = _VALID.get(check)
    if known is not None and value in known:
        return
    why = check(value)
    if why is not None:
        _fail(frame, why, ErrorCode.INVALID_NAME)
    if known is None:
        known = _VALID[check] = set()
    elif len(known) >= _VALID_MAX:
        known.clear()
    known.add(value)


def _headers(frame: str, value: object) -> None:
    if value is None:
        return
    if type(value) is not dict:
        _fail(frame, f"headers must be a map or nil, not {type(value).__name__}")
    for k, v in value.items():
        if type(k) is not str or type(v) is not str:
            _fail(frame, "headers must map strings to strings")


def _int_tuple(frame: str, name: str, value: object) -> tuple[int, ...]:
    if type(value) not in (list, tuple):
        _fail(frame, f"{name} must be an array, not {type(value).__name__}")
    for v in value:  # type: ignore[attr-defined]
        _uint(frame, name, v)
    return tuple(value)  # type: ignore[arg-type]


def _start(frame: str, start: object, start_value: object) -> None:
    if start not in START_KINDS:
        _fail(frame, f"start must be one of {START_KINDS}, not {start!r}", ErrorCode.BAD_REQUEST)
    if start in ("offset", "time"):
        _uint(frame, "start_value", start_value)
    elif start_value is not None:
        _fail(frame, f"start {start!r} takes no start_value", ErrorCode.BAD_REQUEST)


class Frame:
    """Base of every wire frame. Subclasses set ``TYPE`` and their fields."""

    __slots__ = ()
    TYPE: ClassVar[FrameType]
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]

    def to_wire(self) -> list[Any]:
        """Return the frame as its wire list ``[TYPE, *fields]``."""
        return [self.TYPE, *type(self)._values(self)]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Frame:
        """Rebuild a frame from its wire list (element 0 already checked).

        Raises:
            LocalProtocolError: a field is invalid (the Connection maps this).
        """
        if len(items) != len(cls._FIELDS) + 1:
            _fail(cls.TYPE.name, f"expected {len(cls._FIELDS)} fields, got {len(items) - 1}")
        return cls(*items[1:])


_C = TypeVar("_C")


@dataclass_transform(frozen_default=True)
def _frame(cls: type[_C]) -> type[_C]:
    """Class decorator: slotted dataclass that records its field order.

    Frames are values: treat them as immutable (type checkers do, through
    ``frozen_default``). They are not ``frozen=True`` at run time because a
    frozen dataclass sets each field through ``object.__setattr__``, which
    costs more than the whole field validation of a PUBLISH on the hot path.
    """
    dc: Any = dataclass(slots=True)(cls)
    dc._FIELDS = names = tuple(f.name for f in fields(dc))
    # attrgetter of 2+ names returns a tuple in one C call; of one name, the bare value.
    dc._values = operator.attrgetter(*names) if len(names) > 1 else staticmethod(lambda obj: (getattr(obj, names[0]),))
    return dc  # type: ignore[no-any-return]


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen field in __post_init__
