"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes.

Theory of operation
-------------------
``FrameDecoder.feed(chunk)`` returns every complete frame body now
available, each a slice of the chunk (one copy). Rules:

1. The length prefix is checked against ``max_frame_size`` as soon as its four
   bytes are present, *before* any body byte is buffered for it, so a hostile
   "2^32-1" header costs nothing (aiokafka forgets this; Kafka CVE-2022-34917).
2. A chunk is consumed with a moving read position, never rescanned from the
   start (h11 ``_receivebuffer``), so many small frames in one large chunk
   cost O(total bytes). What follows the last whole frame is kept as chunks
   and joined only once they can hold the next frame (its length is known
   from its header), so a large frame arriving in many reads is copied once,
   not once per read.
3. Once an error has been raised the decoder is poisoned: every later call
   raises the same error, because the byte stream has lost its framing.

The body is returned as ``bytes``; decoding the msgpack inside happens in
:func:`unpack_body`, the single place where msgpack exceptions become
:class:`RemoteProtocolError`.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack

from .errors import ErrorCode, RemoteProtocolError

__all__ = ["FLAT_TYPES", "HEADER", "FrameDecoder", "encode_frame", "find_bad_map_key", "pack_body", "unpack_body"]

#: The length prefix: unsigned 32-bit, big-endian.
HEADER: Final = struct.Struct(">I")
_HEADER_SIZE: Final = HEADER.size
_pack_len = HEADER.pack
_unpack_len = HEADER.unpack_from

# One packer per process is safe: ``msgpack.Packer.pack`` is re-entrant for the
# default autoreset=True and holds no state between calls. use_bin_type keeps
# bytes and str distinct on the wire.
_packer: Final = msgpack.Packer(use_bin_type=True)
_pack = _packer.pack
_unpackb: Final = msgpack.unpackb

# msgpack's own nesting/size guards: a 10,000-deep nested array or a map with
# a billion claimed entries is refused by the C unpacker before it allocates.
_MAX_ITEMS: Final = 1 << 20


def pack_body(value: Any) -> bytes:
    """Encode one msgpack value (no length prefix)."""
    data: bytes = _pack(value)
    return data


def encode_frame(value: Any) -> bytes:
    """Encode one value as a complete frame: length prefix + msgpack body.

    Args:
        value: any msgpack-serialisable value (a frame's wire list).

    Returns:
        The bytes to write to the socket.
    """
    body: bytes = _pack(value)
    return _pack_len(len(body)) + body


#: unpackb with its limits bound, per frame limit (a handful of values per process).
_unpackers: Final[dict[int, Callable[[bytes], Any]]] = {}


def unpack_body(body: bytes, max_size: int) -> Any:
    """Decode one frame body; every msgpack failure becomes RemoteProtocolError.

    Args:
        body: the frame body, exactly as framed.
        max_size: the frame limit, used to bound string/array sizes.

    Returns:
        The decoded msgpack value.

    Raises:
        RemoteProtocolError: MALFORMED_FRAME if the body is not exactly one
            valid msgpack value.
    """
    if len(body) <= _MAX_ITEMS:
        # unpackb's own limits default to len(body), tighter than any bound
        # below; a call with one keyword costs half of the bound partial.
        try:
            return _unpackb(body, ext_hook=_no_ext)
        except Exception as exc:
            raise _malformed(exc) from exc
    unpack = _unpackers.get(max_size)
    if unpack is None:
        unpack = _unpackers[max_size] = functools.partial(
            msgpack.unpackb,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=min(max_size, _MAX_ITEMS),
            max_map_len=min(max_size, _MAX_ITEMS),
            max_ext_len=0,
            ext_hook=_no_ext,  # (max_ext_len=0 still lets an empty ext through)
        )
    try:
        return unpack(body)
    except Exception as exc:  # msgpack raises ValueError, ExtraData, RecursionError, ...
        raise _malformed(exc) from exc


# --- map keys: what the packer writes and unpack_body refuses ----------------
#
# msgpack packs a dict with keys of any packable type, but unpack_body (as
# msgpack's unpackb by default: strict_map_key) accepts only str and bin keys:
# a frame with an int key, say, is MALFORMED_FRAME to its peer, which then
# closes the connection. The sender checks (Connection.send, for the one
# free-form value: a PUBLISH payload) with unpack_body itself; this finds the
# key to name in the error.

#: Payload types with nothing inside: no map key to check.
FLAT_TYPES: Final = frozenset({bytes, str, int, float, bool, type(None)})
#: The key types unpack_body accepts: what msgpack packs as str or bin.
_KEY_TYPES: Final = (str, bytes, memoryview)


def find_bad_map_key(value: Any) -> str | None:
    """Where ``value`` (a payload) has a map key :func:`unpack_body` refuses.

    Iterative, so any depth msgpack packs is fine; it runs only to word an
    error (the check is unpack_body's).

    Args:
        value: the payload.

    Returns:
        Where the first key other than a str or bytes is, e.g.
        ``"payload['http'] has the key 200 (int)"``; None when there is none.
    """
    todo: list[tuple[Any, str]] = [(value, "payload")]
    while todo:
        item, path = todo.pop()
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, _KEY_TYPES):
                    return f"{path} has the key {key!r} ({type(key).__name__})"
            todo.extend((v, f"{path}[{k!r}]") for k, v in reversed(item.items()))
        elif isinstance(item, (list, tuple)):
            todo.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
    return None


def _no_ext(code: int, data: bytes) -> Any:
    """msgpack's hook for ext values: the protocol has none (SPEC section 1)."""
    raise ValueError(f"ext type {code} is not allowed")


def _malformed(exc: Exception) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"frame body is not one valid msgpack value: {type(exc).__name__}: {exc}",
        code=ErrorCode.MALFORMED_FRAME,
    )


class FrameDecoder:
    """Streaming decoder: feed bytes, get complete frame bodies.

    Args:
        max_frame_size: the largest body accepted, in bytes.
    """

    __slots__ = ("_error", "_have", "_need", "_parts", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        #: Bytes received after the last whole frame (the start of the next), in chunks.
        self._parts: list[bytes] = []
        self._have = 0  # their total length
        self._need = 0  # the length they must reach before the next frame can be whole
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return self._have

    def take(self) -> bytes:
        """Return and forget the bytes buffered after the last whole frame.

        They start a frame; the caller prepends them to the next chunk (a
        connection that inspects whole chunks itself, :class:`PubAckRun`).
        """
        data = b"".join(self._parts)
        self._parts.clear()
        self._have = self._need = 0
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes and return every frame body now complete.

        Args:
            data: the next chunk from the socket (may be empty).

        Returns:
            The complete frame bodies, in order (possibly none).

        Raises:
            RemoteProtocolError: FRAME_TOO_LARGE when a length prefix exceeds
                ``max_frame_size`` (its ``before``: the bodies complete before
                that header); the decoder then stays failed.
        """
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)  # kept, maybe: a copy the caller cannot change
        parts = self._parts
        if parts:
            parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []  # a large frame arriving: joined once, when whole
            data = b"".join(parts)
            parts.clear()
        frames: list[bytes] = []
        append = frames.append
        pos = 0
        end = len(data)
        limit = self.max_frame_size
        need = _HEADER_SIZE
        while end - pos >= _HEADER_SIZE:
            (size,) = _unpack_len(data, pos)
            if size > limit:
                # Drop what we hold: nothing after a bad header can be framed.
                self._have = 0
                why = f"frame of {size} bytes exceeds the limit of {limit} bytes"
                self._error = RemoteProtocolError(why, code=ErrorCode.FRAME_TOO_LARGE)
                raise RemoteProtocolError(why, code=ErrorCode.FRAME_TOO_LARGE, before=frames)
            stop = pos + _HEADER_SIZE + size
            if stop > end:
                need = stop - pos
                break
            append(data[pos + _HEADER_SIZE : stop])
            pos = stop
        if pos < end:
            parts.append(data[pos:] if pos else data)
            self._have = end - pos
            self._need = need
        else:
            self._have = 0
        return frames
