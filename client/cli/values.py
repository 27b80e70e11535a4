"""JSON in and out: payloads, bytes, messages, frames.

JSON has no bytes type, msgpack does. Everywhere ``tidings`` prints or reads
JSON, a bytes value is written as a one-key object:

* ``{"$base64": "AAEC"}`` (the default), or
* ``{"$hex": "000102"}`` (``tidings raw --hex``).

Both forms are accepted on input (``tidings pub`` payloads, ``tidings raw``
frames), so output can be fed back in. Non-finite floats print as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (JSON has no such
numbers); map keys that are bytes print as ``"$base64:..."`` strings.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from typing import Any, Final

from ..subscription import Message
from .common import UsageError

__all__ = [
    "FORMATS",
    "format_message",
    "from_jsonable",
    "message_dict",
    "parse_payload",
    "to_json",
    "to_jsonable",
]

FORMATS: Final = ("json", "text", "raw")

# A "bare word" payload is taken as a string: no whitespace, and none of the
# characters that make a typo in a JSON object, array or string likely.
_BARE_WORD: Final = re.compile(r"[^\s\"'{}\[\],]+")


def to_jsonable(value: Any, *, hex_bytes: bool = False) -> Any:
    """Convert a msgpack value into something ``json.dumps`` always accepts."""
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if hex_bytes:
            return {"$hex": data.hex()}
        return {"$base64": base64.b64encode(data).decode("ascii")}
    if isinstance(value, dict):
        return {_key(k): to_jsonable(v, hex_bytes=hex_bytes) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, hex_bytes=hex_bytes) for v in value]
    if isinstance(value, int):  # int subclasses (enums); bool is final
        return int(value)
    if isinstance(value, float):
        return to_jsonable(float(value))
    return str(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        return "$base64:" + base64.b64encode(bytes(key)).decode("ascii")
    return str(key)


def from_jsonable(value: Any) -> Any:
    """The inverse of :func:`to_jsonable` for bytes: ``{"$base64": ...}``/``{"$hex": ...}`` become bytes.

    Raises:
        UsageError: a ``$base64``/``$hex`` object whose text does not decode.
    """
    if isinstance(value, dict):
        if len(value) == 1:
            ((k, v),) = value.items()
            if k in ("$base64", "$hex") and isinstance(v, str):
                try:
                    return base64.b64decode(v, validate=True) if k == "$base64" else bytes.fromhex(v)
                except (binascii.Error, ValueError) as exc:
                    raise UsageError(f"bad {k} value {v[:40]!r}: {exc}") from None
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str) -> Any:
    """Strict JSON (no NaN/Infinity), with ``$base64``/``$hex`` objects turned into bytes.

    Raises:
        ValueError: not JSON.
        UsageError: a bad bytes object.
    """
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return from_jsonable(value)


def parse_payload(text: str, *, as_string: bool = False, what: str = "PAYLOAD") -> Any:
    """A payload from the command line or one stdin line.

    JSON is decoded; a bare word (no spaces, no quotes or brackets) is a
    string; ``as_string`` takes the text verbatim.

    Raises:
        UsageError: neither JSON nor a bare word.
    """
    if as_string:
        return text
    try:
        return parse_json(text)
    except ValueError as exc:
        if _BARE_WORD.fullmatch(text):
            return text
        shown = text if len(text) <= 40 else text[:40] + "..."
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise UsageError(
            f"{what} is not JSON ({msg}): {shown!r}; quote strings as JSON, or use --string to send text as is"
        ) from None


def to_json(value: Any, *, hex_bytes: bool = False) -> str:
    """One compact JSON line."""
    return json.dumps(to_jsonable(value, hex_bytes=hex_bytes), ensure_ascii=False, separators=(",", ":"))


def message_dict(msg: Message) -> dict[str, Any]:
    """The JSON form of a message (the keys in the documented order)."""
    return {
        "queue": msg.queue,
        "event": msg.event,
        "offset": msg.offset,
        "timestamp": msg.timestamp,
        "headers": msg.headers,
        "payload": msg.payload,
        "deliveries": msg.deliveries,
    }


def iso_ms(timestamp_ms: int) -> str:
    """``2024-05-01T12:00:00.123Z`` for a time in ms since the epoch."""
    try:
        dt = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return str(timestamp_ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def format_message(msg: Message, fmt: str) -> bytes:
    """One output line (newline included) for a message in format ``json``, ``text`` or ``raw``."""
    if fmt == "json":
        line = to_json(message_dict(msg))
    elif fmt == "text":
        parts = [iso_ms(msg.timestamp), f"{msg.queue}#{msg.offset}", msg.event, to_json(msg.payload)]
        parts += [f"{k}={v}" for k, v in msg.headers.items()]
        if msg.deliveries > 1:
            parts.append(f"(delivery {msg.deliveries})")
        line = " ".join(parts)
    else:  # raw: the payload itself
        payload = msg.payload
        if isinstance(payload, bytes):
            return payload + b"\n"
        line = payload if isinstance(payload, str) else to_json(payload)
    return line.encode("utf-8", "backslashreplace") + b"\n"
