"""The hot path in bytes: stored record bodies, DELIVER, BATCH and PUBACK.

The broker stores each message as a *record body*: the four msgpack values
``event, timestamp_ms, headers, payload`` concatenated (no array header).
DELIVER and BATCH frames end with exactly those four values, so the broker
can splice stored bytes into a frame without decoding or re-encoding the
payload (:func:`encode_deliver`, :func:`encode_batch`). PUBACKs are written
at a fixed width so that one ``struct`` call encodes or decodes each
(:func:`encode_pubacks`, :func:`decode_fixed_puback`), and a client takes a
run of them from one read as a :class:`PubAckRun` without a frame object
each. Every function here
produces exactly what the generic encoder of :mod:`protocol.messages` would
accept; the tests check each against it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final

from .errors import LocalProtocolError
from .framing import HEADER, pack_body
from .messages import FrameType, PubAck

__all__ = [
    "PubAckRun",
    "decode_fixed_puback",
    "encode_batch",
    "encode_deliver",
    "encode_pubacks",
    "encode_record",
    "record_event",
]

_new_frame: Final = object.__new__
_pack = pack_body
_pack_len = HEADER.pack
_DELIVER: Final = int(FrameType.DELIVER)
_BATCH: Final = int(FrameType.BATCH)


def encode_record(event: str, timestamp: int, headers: dict[str, str] | None, payload: Any) -> bytes:
    """Encode a stored record body: ``event, timestamp, headers, payload`` concatenated.

    Raises:
        LocalProtocolError: the payload is not msgpack-serialisable.
    """
    try:
        # One pack call; drop the 1-byte fixarray header (0x94) of the 4-tuple.
        return _pack((event, timestamp, headers, payload))[1:]
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"payload cannot be encoded as msgpack: {exc}") from exc


def record_event(body: bytes) -> str:
    """Return the event name at the start of a record body without decoding the rest."""
    b0 = body[0]
    if 0xA0 <= b0 <= 0xBF:  # fixstr: names up to 31 bytes
        return body[1 : 1 + (b0 & 0x1F)].decode()
    if b0 == 0xD9:  # str8: names up to 255 bytes (MAX_NAME_LENGTH is 128)
        return body[2 : 2 + body[1]].decode()
    raise LocalProtocolError("record body does not start with an event name")


def encode_deliver(sub_id: int, offset: int, deliveries: int, body: bytes) -> bytes:
    """Encode a DELIVER frame around a stored record body, without re-encoding it.

    Returns:
        The complete frame (length prefix included).
    """
    head = _pack((_DELIVER, sub_id, offset, deliveries))
    # 0x94 (fixarray of 4) becomes 0x98: the record body supplies 4 more items.
    size = len(head) + len(body)
    return _pack_len(size) + b"\x98" + head[1:] + body


def encode_batch(req: int, next_offset: int, records: list[tuple[int, int, bytes]]) -> bytes:
    """Encode a BATCH frame from ``(offset, deliveries, body)`` stored records.

    Returns:
        The complete frame (length prefix included).
    """
    parts = [_pack((_BATCH, req, next_offset)), b""]
    n = len(records)
    parts[0] = b"\x94" + parts[0][1:]  # 4 items: type, req, next_offset, records
    parts[1] = b"\x90" if n == 0 else _array_header(n)
    for offset, deliveries, body in records:
        parts.append(b"\x96" + _pack((offset, deliveries))[1:] + body)
    out = b"".join(parts)
    return _pack_len(len(out)) + out


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_PUBACK: Final = int(FrameType.PUBACK)
# A PUBACK at fixed width: length 21, fixarray(4), type, req and offset as
# uint 64 (0xcf), then the boolean. msgpack lets a writer pick any integer
# format; one struct call per PUBACK costs a third of a generic pack.
_PUBACK_FIXED: Final = struct.Struct(">IBBBQBQB")
_pack_puback: Final = _PUBACK_FIXED.pack
#: The body of such a PUBACK, for the client's decoder (see decode_fixed_puback).
_PUBACK_BODY: Final = struct.Struct(">BBBQBQB")
_PUBACK_BODY_SIZE: Final = _PUBACK_BODY.size  # 21
_unpack_puback: Final = _PUBACK_BODY.unpack


def decode_fixed_puback(body: bytes) -> PubAck | None:
    """A PUBACK body in the broker's fixed-width layout, or None for anything else.

    The client's hot path: one ``struct`` call instead of msgpack and the
    field checks, which the layout makes unnecessary (two uint 64s and a
    boolean). Any other encoding of a PUBACK takes the general path.
    """
    if len(body) != _PUBACK_BODY_SIZE:
        return None
    head, kind, req_tag, req, offset_tag, offset, dup = _unpack_puback(body)
    if head != 0x94 or kind != _PUBACK or req_tag != 0xCF or offset_tag != 0xCF or dup not in (0xC2, 0xC3):
        return None
    ack: Any = _new_frame(PubAck)
    ack.req = req
    ack.offset = offset
    ack.duplicate = dup == 0xC3
    return ack  # type: ignore[no-any-return]


def encode_pubacks(acks: list[tuple[int, int, bool]]) -> bytes:
    """Encode one PUBACK frame per ``(req, offset, duplicate)``, joined for one write.

    Every frame is 25 bytes: ``req`` and ``offset`` are written as msgpack
    uint 64 whatever their value (any msgpack decoder reads them).

    Returns:
        The frames' bytes (length prefixes included).
    """
    p = _pack_puback
    return b"".join([p(21, 0x94, _PUBACK, 0xCF, req, 0xCF, offset, 0xC3 if dup else 0xC2) for req, offset, dup in acks])


#: Offsets of the bytes that are the same in every fixed-width PUBACK frame
#: (length prefix, fixarray, type, the two uint 64 tags) and their values.
_RUN_CONSTANT: Final = ((0, 0), (1, 0), (2, 0), (3, 21), (4, 0x94), (5, _PUBACK), (6, 0xCF), (15, 0xCF))
_RUN_FRAME: Final = 4 + _PUBACK_BODY_SIZE  # 25
_RUN_PREFIX: Final = _PUBACK_FIXED.pack(21, 0x94, _PUBACK, 0xCF, 0, 0xCF, 0, 0xC2)[:7]
_iter_run: Final = struct.Struct(">7xQxQB").iter_unpack  # (req, offset, duplicate byte)


class PubAckRun:
    """Consecutive PUBACK frames in the broker's fixed-width layout, undecoded.

    :meth:`Connection.events <protocol.Connection.events>` returns one
    instead of a PubAck per frame when asked to (``puback_runs``): a
    publisher's reads are mostly PUBACKs, and the run's checks are a few
    C-level passes over its bytes instead of Python code per frame.
    Iterating yields ``(req, offset, duplicate)`` with ``duplicate`` the raw
    msgpack boolean byte (``0xc3`` true, ``0xc2`` false).
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // _RUN_FRAME

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return _iter_run(self.data)

    def __repr__(self) -> str:
        return f"<PubAckRun of {len(self)}>"


def puback_run_length(data: bytes) -> int:
    """How many whole fixed-width PUBACK frames ``data`` starts with (0 if it
    does not start with one).

    ``data`` must start at a frame boundary. Each byte position that is fixed
    in the layout is checked for all frames at once: a strided slice of the
    buffer, stripped of the expected value, is as long as the part after the
    first frame that differs.
    """
    whole = len(data) // _RUN_FRAME
    if not whole or data[:7] != _RUN_PREFIX:
        return 0
    end = whole * _RUN_FRAME
    n = whole
    for pos, value in _RUN_CONSTANT:
        column = data[pos:end:_RUN_FRAME]
        rest = len(column.lstrip(_BYTES[value]))
        if rest:
            n = min(n, whole - rest)
    rest = len(data[_RUN_FRAME - 1 : end : _RUN_FRAME].lstrip(b"\xc2\xc3"))
    return min(n, whole - rest)


_BYTES: Final = [bytes((i,)) for i in range(256)]
