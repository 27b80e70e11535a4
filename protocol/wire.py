"""The hot path in bytes: stored record bodies, DELIVER, BATCH and PUBACK.

The broker stores each message as a *record body*: the four msgpack values
``event, timestamp_ms, headers, payload`` concatenated (no array header).
DELIVER and BATCH frames end with exactly those four values, so the broker
can splice stored bytes into a frame without decoding or re-encoding the
payload (:func:`encode_deliver`, :func:`encode_batch`). PUBACKs are written
at a fixed width so that one ``struct`` call encodes or decodes each
(:func:`encode_pubacks`, :func:`decode_fixed_puback`), and a client takes a
run of them from one read as a :class:`PubAckRun` without a frame object
each. The other way, a plain PUBLISH with a ``bin`` payload is located
field by field (:func:`locate_plain_publish`) so that the broker can copy
its payload into the record body without decoding it. Every function here
agrees with the generic codec of :mod:`protocol.messages` (it encodes what
that would accept, it decodes or locates what that would decode); the tests
check each against it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final

from .errors import LocalProtocolError
from .framing import HEADER, pack_body
from .messages import FrameType, PubAck

__all__ = [
    "BATCH_OVERHEAD",
    "BATCH_RECORD_OVERHEAD",
    "PubAckRun",
    "decode_fixed_puback",
    "encode_batch",
    "encode_deliver",
    "encode_pubacks",
    "encode_record",
    "locate_plain_publish",
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


_U16: Final = struct.Struct(">H").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
_U64: Final = struct.Struct(">Q").unpack_from


def locate_plain_publish(body: bytes) -> tuple[int, int, int, bool] | None:
    """Find the fields of a *plain* PUBLISH body without decoding it.

    Plain means ``[3, req, queue, event, payload, nil, nil]`` (no headers, no
    message_id) with ``req`` a msgpack positive fixint or uint and ``queue``
    and ``event`` fixstr or str8. When the payload is a ``bin`` in the
    shortest format for its length (how msgpack writes ``bytes``) and fills
    the body up to the two nils, the body is exactly one msgpack value (every
    length is checked against the body's) and the payload's bytes are what
    :func:`encode_record` writes for it: *whole*, they can be copied as they
    are (a bin is any bytes: there is nothing in it to check). Any other
    payload must still be decoded to be checked.

    This checks structure only: the names' bytes are not decoded (the
    broker's Connection takes them only if exactly these bytes passed the
    general path before, see ``Connection.events_spliced``). The msgpack
    format bytes are literals below, for speed: 0x97 fixarray of 7, 0xC0 nil,
    0xCC-0xCF uint 8-64, 0xA0-0xBF fixstr, 0xD9 str 8, 0xC4-0xC6 bin 8-32.

    Returns:
        ``(req, names, payload, whole)``: the req, the offset where the
        queue's encoding starts (queue and event are ``body[names:payload]``),
        the offset of the payload's and whether ``body[payload:-2]`` is a
        whole bin payload as above; None for anything else, malformed or
        not, which then takes the general path.
    """
    n = len(body)
    # 9 bytes: the shortest plain body, 97 03 00 a0 a0 c4 00 c0 c0.
    if n < 9 or body[0] != 0x97 or body[1] != 3 or body[n - 1] != 0xC0 or body[n - 2] != 0xC0:
        return None
    m = body[2]
    if m < 0x80:  # positive fixint
        req, i = m, 3
    elif m == 0xCD:  # before uint 8: a sequence of requests soon passes 255
        req, i = _U16(body, 3)[0], 5
    elif m == 0xCC:
        req, i = body[3], 4
    elif m == 0xCE:
        req, i = _U32(body, 3)[0], 7
    elif m == 0xCF and n >= 11:
        req, i = _U64(body, 3)[0], 11
    else:  # a signed int, a float, ...: the general path decides
        return None
    names = i
    # Queue, then event: the same check twice, unrolled (a loop costs the
    # broker ~330 instructions per message, 1.2%, measured with
    # bench.instructions). Each leaves the 3 bytes after the name's format
    # byte in the body (its str 8 length, the payload's format, a nil).
    if i >= n - 3:
        return None
    m = body[i]
    if 0xA0 <= m <= 0xBF:
        i += m - 0x9F
    elif m == 0xD9:
        i += 2 + body[i + 1]
    else:
        return None
    if i >= n - 3:
        return None
    m = body[i]
    if 0xA0 <= m <= 0xBF:
        i += m - 0x9F
    elif m == 0xD9:
        i += 2 + body[i + 1]
    else:
        return None
    # A whole bin payload fills the body up to the two nils: its format byte
    # and length field, then exactly `length` bytes, in the shortest format.
    size = n - 2 - i
    if size < 1:
        return None
    m = body[i]
    if m == 0xC4:
        whole = size >= 2 and body[i + 1] == size - 2
    elif m == 0xC5:
        whole = size >= 3 and _U16(body, i + 1)[0] == size - 3 >= 0x100
    elif m == 0xC6:
        whole = size >= 5 and _U32(body, i + 1)[0] == size - 5 >= 0x10000
    else:
        whole = False
    return req, names, i, whole


def record_event(body: bytes) -> str:
    """Return the event name at the start of a record body without decoding the rest."""
    b0 = body[0]
    if 0xA0 <= b0 <= 0xBF:  # fixstr: names up to 31 bytes
        return body[1 : 1 + (b0 & 0x1F)].decode()
    if b0 == 0xD9:  # str8: names up to 255 bytes (MAX_NAME_LENGTH is 128)
        return body[2 : 2 + body[1]].decode()
    raise LocalProtocolError("record body does not start with an event name")


#: Bytes after the format byte of a msgpack int: uint 8-64 (0xcc-0xcf), int 8-64 (0xd0-0xd3).
_INT_SIZE: Final = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}


def record_headers_at(body: bytes) -> int:
    """Where the headers of a record body start: after its event name and timestamp.

    Found from the format bytes alone (no msgpack object is made): the body
    is ours (:func:`encode_record`), its event a fixstr or str 8 and its
    timestamp an int.

    Raises:
        LocalProtocolError: the body does not start with an event and a timestamp.
    """
    b0 = body[0]  # the event name, as in record_event (kept inline there: it runs per delivery)
    if 0xA0 <= b0 <= 0xBF:
        i = 1 + (b0 & 0x1F)
    elif b0 == 0xD9:
        i = 2 + body[1]
    else:
        raise LocalProtocolError("record body does not start with an event name")
    m = body[i]
    if m < 0x80 or m >= 0xE0:  # positive or negative fixint
        return i + 1
    size = _INT_SIZE.get(m)
    if size is None:
        raise LocalProtocolError("record body has no timestamp after its event name")
    return i + 1 + size


def encode_deliver(sub_id: int, offset: int, deliveries: int, body: bytes) -> bytes:
    """Encode a DELIVER frame around a stored record body, without re-encoding it.

    Returns:
        The complete frame (length prefix included).
    """
    head = _pack((_DELIVER, sub_id, offset, deliveries))
    # 0x94 (fixarray of 4) becomes 0x98: the record body supplies 4 more items.
    size = len(head) + len(body)
    return _pack_len(size) + b"\x98" + head[1:] + body


#: The most bytes a BATCH frame body spends on its own fields: its fixarray,
#: type, ``req`` and ``next_offset`` (a uint 64 each at most: 9 bytes), and
#: the records' array header (an array 32 at most: 5 bytes). 1+1+9+9+5.
BATCH_OVERHEAD: Final = 25
#: The most bytes a BATCH frame body spends on one record besides its stored
#: body: the entry's fixarray of 6, ``offset`` and ``deliveries`` (9 each). A
#: batch of records whose bodies and entries fit in ``max_frame_size -
#: BATCH_OVERHEAD`` fits in the frame limit, whatever the numbers in it.
BATCH_RECORD_OVERHEAD: Final = 19


def encode_batch(req: int, next_offset: int, records: list[tuple[int, int, bytes]]) -> bytes:
    """Encode a BATCH frame from ``(offset, deliveries, body)`` stored records.

    The frame's body is at most ``BATCH_OVERHEAD`` bytes plus, per record,
    its body and ``BATCH_RECORD_OVERHEAD``.

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
_RUN_CONSTANT: Final = tuple(
    (pos, bytes((value,)))
    for pos, value in ((0, 0), (1, 0), (2, 0), (3, 21), (4, 0x94), (5, _PUBACK), (6, 0xCF), (15, 0xCF))
)
#: The size of a fixed-width PUBACK frame, length prefix included (25).
PUBACK_FRAME_SIZE: Final = 4 + _PUBACK_BODY_SIZE
_BOOLEANS: Final = b"\xc2\xc3"  # msgpack false, true
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
        return len(self.data) // PUBACK_FRAME_SIZE

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
    whole = len(data) // PUBACK_FRAME_SIZE
    if not whole or data[:7] != _RUN_PREFIX:
        return 0
    if whole == 1:  # a lone publisher's read: the first 7 bytes are checked, the rest directly
        return 1 if data[15] == 0xCF and data[24] in _BOOLEANS else 0
    end = whole * PUBACK_FRAME_SIZE
    n = whole
    for pos, value in _RUN_CONSTANT:
        column = data[pos:end:PUBACK_FRAME_SIZE]
        rest = len(column.lstrip(value))
        if rest:
            n = min(n, whole - rest)
    rest = len(data[PUBACK_FRAME_SIZE - 1 : end : PUBACK_FRAME_SIZE].lstrip(_BOOLEANS))
    return min(n, whole - rest)
