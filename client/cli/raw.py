"""``tidings raw``: frames as JSON lines, straight onto the wire and back.

Input: one frame per line, as its wire list (``[TYPE, field1, ...]``, the
field order of ``protocol/messages.py``); TYPE may be the number or the name
(``["PING", 7]``). Blank lines and lines starting with ``#`` are skipped.
Nothing is checked before sending: this is how to see what the broker says
to a frame a real client would never send.

Output: one JSON object per frame received, ``{"type": "PUBACK", "frame":
[4, 1, 0, false]}``. A frame that breaks the protocol's rules gets an
``"invalid"`` key saying why; bytes follow :mod:`client.cli.values`
(``{"$base64": ...}``, or ``{"$hex": ...}`` with ``--hex``, which also adds
the frame's wire bytes as ``"hex"``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl
import sys
from typing import Any, Final

from protocol import (
    PROTOCOL_VERSION,
    ConnectionLost,
    FrameDecoder,
    FrameType,
    RemoteProtocolError,
    RequestTimeout,
    ServerError,
    encode_frame,
)
from protocol.framing import unpack_body
from protocol.messages import FRAME_CLASSES
from protocol.wording import many

from .._address import refused_handshake_hint
from .._transport import connect_failed
from ..client import parse_url
from .common import EXIT_OK, Context, Stopped, UsageError, client_cert, tls_context
from .streams import LineReader
from .values import parse_json, to_json

__all__ = ["describe_frame", "parse_frame_line", "run_decode", "run_raw"]

#: Frames that get a reply carrying the same req (ACK/NACK only when req != 0).
REQUEST_TYPES: Final = frozenset(
    int(t) for t in (FrameType.HELLO, FrameType.PUBLISH, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE,
                     FrameType.ACK, FrameType.NACK, FrameType.FETCH, FrameType.STATUS, FrameType.PING)
)  # fmt: skip
REPLY_TYPES: Final = frozenset(
    int(t) for t in (FrameType.WELCOME, FrameType.PUBACK, FrameType.BATCH, FrameType.STATUS_REPLY,
                     FrameType.PONG, FrameType.OK, FrameType.ERR)
)  # fmt: skip
#: Decoding captured streams: accept any length the 4-byte prefix can say.
MAX_DECODE: Final = (1 << 32) - 1
#: A live connection: far above any broker's frame limit, far below what other protocols look like.
MAX_LIVE_FRAME: Final = 1 << 28


def type_name(items: Any) -> str:
    """The frame type's name, ``UNKNOWN(n)``, or ``NOT_A_FRAME``."""
    if isinstance(items, list) and items and type(items[0]) is int:
        try:
            return FrameType(items[0]).name
        except ValueError:
            return f"UNKNOWN({items[0]})"
    return "NOT_A_FRAME"


def frame_problem(items: Any) -> str | None:
    """Why this wire list is not a valid frame, or None if it is."""
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        return "a frame must be an array whose first element is the frame type"
    cls = FRAME_CLASSES.get(items[0])
    if cls is None:
        return f"unknown frame type {items[0]}"
    try:
        cls.from_wire(items)
    except Exception as exc:  # LocalProtocolError mostly; a hostile BATCH record may raise TypeError
        return str(exc)
    return None


def describe_frame(body: bytes, *, hex_bytes: bool = False, wire: bytes | None = None) -> dict[str, Any]:
    """The JSON object printed for one received (or decoded) frame body."""
    try:
        items = unpack_body(body, MAX_DECODE)
    except RemoteProtocolError as exc:
        return {"type": "UNDECODABLE", "error": str(exc), "hex": (wire if wire is not None else body).hex()}
    out: dict[str, Any] = {"type": type_name(items), "frame": items}
    problem = frame_problem(items)
    if problem is not None:
        out["invalid"] = problem
    if hex_bytes and wire is not None:
        out["hex"] = wire.hex()
    return out


def parse_frame_line(text: str) -> list[Any]:
    """One input line as a wire list (type names resolved, ``$base64``/``$hex`` as bytes).

    Raises:
        UsageError: not a JSON array, or an unknown type name.
    """
    try:
        value = parse_json(text)
    except ValueError as exc:
        raise UsageError(f"not JSON: {exc}") from None
    if not isinstance(value, list) or not value:
        raise UsageError('a frame is a JSON array such as [15, 1] or ["PING", 1]')
    if isinstance(value[0], str):
        try:
            value[0] = int(FrameType[value[0].upper()])
        except KeyError:
            names = ", ".join(t.name for t in FrameType)
            raise UsageError(f"unknown frame type {value[0]!r} (one of {names})") from None
    return value


class _Session:
    """One raw connection: a reader printing frames, stdin lines sent as frames."""

    def __init__(self, ctx: Context, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ctx = ctx
        self.reader = reader
        self.writer = writer
        self.hex = bool(ctx.args.hex)
        self.decoder = FrameDecoder(MAX_LIVE_FRAME)
        self.error: RemoteProtocolError | None = None
        self.pending: collections.Counter[int] = collections.Counter()
        self.pending_names: dict[int, str] = {}
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.welcome: list[Any] | None = None
        self.refusal: list[Any] | None = None
        self.output_gone = False
        self.bye_sent = False
        self.handshaking = False
        #: The stdin lines read so far (for the message when the broker closes the connection).
        self.lineno = 0
        #: The last connection-level ERR whose code ends the connection (SHUTTING_DOWN, ...).
        self.fatal: ServerError | None = None
        self._echo: list[dict[str, Any]] = []

    # --- receiving ------------------------------------------------------------

    async def read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.reader.read(256 * 1024)
                except (OSError, ConnectionError):
                    data = b""
                if not data:
                    return
                try:
                    bodies = self.decoder.feed(data)
                except RemoteProtocolError as exc:  # not a tidings peer ("HTTP/1.1 400" is a 1.2 GB frame)
                    for body in exc.before:  # the frames before the bad header
                        await self.on_frame(body)
                    self.error = exc
                    return
                for body in bodies:
                    await self.on_frame(body)
        except BrokenPipeError:
            self.output_gone = True
            self.ctx.stopper.stop("stdout closed")
        finally:
            self.closed.set()
            self.changed.set()

    async def on_frame(self, body: bytes) -> None:
        desc = describe_frame(body, hex_bytes=self.hex, wire=len(body).to_bytes(4, "big") + body)
        items = desc.get("frame")
        await self.ctx.out.line(to_json(desc, hex_bytes=self.hex))
        if not isinstance(items, list) or len(items) < 2 or type(items[0]) is not int:
            return
        kind, req = items[0], items[1]
        if kind == FrameType.PING and type(req) is int and req >= 0:
            self.send(encode_frame([int(FrameType.PONG), req]))  # keep the heartbeat happy
        if self.handshaking:
            # The broker answers a refused HELLO with ERR req 0 (connection-level), then closes.
            if kind == FrameType.WELCOME and req == 1:
                self.welcome, self.handshaking = items, False
            elif kind == FrameType.ERR:
                self.refusal, self.handshaking = items, False
        if kind == FrameType.ERR and req == 0 and len(items) >= 4 and type(items[2]) is int:
            error = ServerError.for_code(items[2], str(items[3]))
            if error.fatal:
                self.fatal = error
        if kind in REPLY_TYPES and type(req) is int:
            if self.pending[req] > 0:
                self.pending[req] -= 1
                if not self.pending[req]:
                    del self.pending[req]
                    self.pending_names.pop(req, None)
            self.changed.set()
        elif kind == FrameType.ERR:
            self.changed.set()

    # --- sending --------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.writer.transport.is_closing():
            self.writer.write(data)

    def send_items(self, items: list[Any]) -> None:
        try:
            data = encode_frame(items)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(f"cannot encode as msgpack: {exc}") from None
        kind = items[0]
        req = items[1] if len(items) > 1 else None
        if kind in REQUEST_TYPES and type(req) is int and not (kind in (FrameType.ACK, FrameType.NACK) and req == 0):
            self.pending[req] += 1
            self.pending_names[req] = type_name(items)
        self.bye_sent = self.bye_sent or kind == FrameType.BYE
        self.send(data)
        if self.ctx.args.echo:
            desc = describe_frame(data[4:], hex_bytes=self.hex, wire=data)
            desc["sent"] = True
            self._echo.append(desc)

    async def flush_echo(self) -> None:
        while self._echo:
            await self.ctx.out.line(to_json(self._echo.pop(0), hex_bytes=self.hex))

    async def wait_for(self, done: Any, timeout: float) -> bool:
        """Wait until ``done()`` is true, the broker closes, or ``timeout``; return ``done()``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done() and not self.closed.is_set():
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self.ctx.stopper.race(self.changed.wait())
            except TimeoutError:
                break
        return bool(done())

    # --- the session ----------------------------------------------------------

    async def run(self) -> int:
        args = self.ctx.args
        reading = asyncio.ensure_future(self.read_loop())
        bad_input: UsageError | None = None
        try:
            if not args.no_hello:
                credentials = {"token": args.token} if args.token else None
                self.handshaking = True
                self.send_items([int(FrameType.HELLO), 1, PROTOCOL_VERSION, args.name, credentials])
                await self.flush_echo()
                if not await self.wait_for(lambda: self.welcome is not None or self.refusal is not None,
                                           args.timeout):  # fmt: skip
                    if self.error is not None:
                        raise self.error
                    if self.closed.is_set():
                        # TLS 1.3: a refused client certificate is said once our handshake is done.
                        tls = self.writer.get_extra_info("ssl_object") is not None
                        hint = f" ({refused_handshake_hint(client_cert(args))})" if tls else ""
                        raise ConnectionLost(f"the broker closed the connection during the handshake{hint}")
                    raise RequestTimeout("handshake", args.timeout)
                if self.refusal is not None:
                    code, message = self.refusal[2:4] if len(self.refusal) >= 4 else (0, "?")
                    raise ServerError.for_code(code if type(code) is int else 0, str(message))
            bad_input = await self.pump_stdin()
            # stdin is done: wait for the replies, then linger for stray frames (deliveries).
            replied = await self.wait_for(lambda: not self.pending, args.wait)
            if not replied and not self.closed.is_set() and not self.ctx.stopper.stopped:
                missing = ", ".join(f"{self.pending_names.get(r, '?')} req {r}" for r in self.pending)
                self.ctx.warn(f"no reply within {args.wait:g}s to: {missing}")
            if args.linger > 0 and not self.closed.is_set():
                await self.wait_for(lambda: False, args.linger)
        except Stopped:
            pass
        finally:
            ended = self.closed.is_set()  # by the broker (or its bytes), not by us: we close it here
            self.writer.transport.abort()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        if bad_input is not None:
            raise bad_input
        if ended and not self.bye_sent and not self.output_gone and not self.ctx.stopper.stopped:
            raise self.ended_error()
        return EXIT_OK

    def ended_error(self) -> ConnectionLost:
        """The connection ended before we closed it (and not after a BYE we
        sent): exit 2, as for any command whose connection the broker ends."""
        after = f"after stdin line {self.lineno}" if self.lineno else "before any stdin line was sent"
        if self.error is not None:
            return ConnectionLost(f"the broker's byte stream lost its framing ({after}): {self.error}")
        if self.fatal is not None:
            return ConnectionLost(f"the broker ended the connection ({after}): {self.fatal}")
        return ConnectionLost(f"the broker closed the connection ({after})")

    async def _next_line(self, lines: LineReader) -> bytes | None:
        """The next stdin line, or None once the broker has closed the connection."""
        line = asyncio.ensure_future(lines.__anext__())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            await self.ctx.stopper.race(asyncio.wait({line, closed}, return_when=asyncio.FIRST_COMPLETED))
        finally:
            closed.cancel()
            if not line.done():
                line.cancel()
        if line.done() and not line.cancelled():
            return line.result()
        return None

    async def pump_stdin(self) -> UsageError | None:
        """Send every stdin line as a frame; return the input error that stopped it, if any."""
        interactive = os.isatty(0)
        lines = LineReader(0)
        while not self.closed.is_set():
            try:
                raw = await self._next_line(lines)
            except StopAsyncIteration:
                return None
            except OSError as exc:
                return UsageError(f"cannot read stdin: {exc}")
            if raw is None:  # the broker closed the connection while we waited for input
                break
            self.lineno += 1
            text = raw.decode("utf-8", "replace").strip()
            if not text or text.startswith("#"):
                continue
            try:
                self.send_items(parse_frame_line(text))
            except UsageError as exc:
                err = UsageError(f"stdin line {self.lineno}: {exc}")
                if not interactive:
                    return err
                self.ctx.warn(str(err))
                continue
            await self.flush_echo()
        return None  # the broker closed the connection: run() says so


async def run_raw(ctx: Context) -> int:
    args = ctx.args
    host, port, tls = parse_url(args.url)
    context = tls_context(args)  # (first: it refuses TLS files given with a plain URL)
    if tls and context is None:
        context = ssl.create_default_context()
    try:
        async with asyncio.timeout(args.timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except TimeoutError:
        raise RequestTimeout(f"connecting to {host}:{port}", args.timeout) from None
    except OSError as exc:
        raise connect_failed(host, port, exc, context, client_cert(args)) from exc
    return await _Session(ctx, reader, writer).run()


async def run_decode(ctx: Context) -> int:
    """Decode a captured byte stream (a file, or stdin for ``-``) into frames."""
    args = ctx.args
    source = args.decode
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
    decoder = FrameDecoder(MAX_DECODE)
    bodies = decoder.feed(data)
    pos = 0
    try:
        for body in bodies:
            end = pos + 4 + len(body)
            desc = describe_frame(body, hex_bytes=args.hex, wire=data[pos:end])
            await ctx.out.line(to_json(desc, hex_bytes=args.hex))
            pos = end
    except BrokenPipeError:
        return EXIT_OK
    if left := decoder.buffered:
        one = left == 1
        raise UsageError(
            f"{many(left, 'byte')} at offset {pos} {'does' if one else 'do'} not form a complete frame "
            f"({many(len(bodies), 'frame')} decoded before {'it' if one else 'them'})"
        )
    return EXIT_OK
