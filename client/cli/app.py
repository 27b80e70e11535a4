"""The ``tidings`` command line: parser, dispatch, and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import re
import sys
from typing import Any, Final, NoReturn

from protocol import (
    ConfigError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    RequestTimeout,
    ServerError,
    TidingsError,
)
from protocol.messages import MAX_MESSAGE_ID_LENGTH

from ..client import DEFAULT_URL, Client
from .admin import run_delete, run_durables, run_ping, run_queues, run_seek, run_status
from .commands import check_pub, parse_start, run_fetch, run_pub, run_sub
from .common import (
    EXIT_CONNECT,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    TLS_OPTIONS,
    Context,
    Stopped,
    Stopper,
    UsageError,
    client_cert,
    one_line,
    take_tls_files,
    tls_context,
)
from .connecting import StoppedWaiting, connect, connect_error
from .helptext import (
    DELETE_EPILOG,
    DURABLES_EPILOG,
    EXIT_CODES,
    FETCH_EPILOG,
    MAIN_EPILOG,
    PING_EPILOG,
    PUB_EPILOG,
    QUEUES_EPILOG,
    RAW_EPILOG,
    SEEK_EPILOG,
    STATUS_EPILOG,
    SUB_EPILOG,
)
from .raw import run_decode, run_raw
from .streams import Output, silence_stdout, watch_pipe_close
from .values import FORMATS

__all__ = ["build_parser", "main"]

#: -e of sub and fetch. A durable keeps its filter when given none (SPEC section 5): not "every event".
EVENTS_HELP: Final = (
    "only these events; '*' is a wildcard (repeatable, or comma-separated; default: every event, but with "
    "--durable the durable's filter: every event for a new one, the filter it has for an existing one, "
    "which -e '*' widens to every event again)"
)
#: The most a FETCH may wait, in seconds: its ``wait_ms`` is at most 2^40 (protocol/messages.py).
MAX_WAIT: Final = (1 << 40) / 1000
#: The most messages a FETCH may ask for, and a subscription's largest prefetch (protocol/messages.py).
MAX_BATCH: Final = 1 << 20


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit with status 1, not 2."""

    #: The connection options, which every command takes after its name.
    command_options: frozenset[str] = frozenset()

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _int_at_least(minimum: int, maximum: int | None = None) -> Any:
    """An argparse ``type``: a whole number from ``minimum`` (to ``maximum``, when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is not in {minimum}..{maximum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is less than {minimum}")
        return value

    return parse


def _wait_seconds(text: str) -> float:
    """``fetch --wait``: seconds, within what a FETCH can carry (``wait_ms`` < 2^40)."""
    value = _positive_float(text)
    if not value <= MAX_WAIT:  # (inf too: it is no number of milliseconds)
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_WAIT:.0f} seconds")
    return value


def _message_id(text: str) -> str:
    """``pub --id``: 1 to MAX_MESSAGE_ID_LENGTH characters (the broker refuses others)."""
    if not text:
        # Most likely an unset variable (--id "$ID"): the broker would refuse it
        # (an empty id would make every later message with it a duplicate).
        raise argparse.ArgumentTypeError("must not be empty")
    if len(text) > MAX_MESSAGE_ID_LENGTH:
        raise argparse.ArgumentTypeError(f"{len(text)} characters, more than {MAX_MESSAGE_ID_LENGTH}")
    return text


def _seconds(text: str) -> float:
    value = _positive_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _version() -> str:
    """The installed tidings distribution's version (the broker's STATUS says its own the same way)."""
    try:
        return importlib.metadata.version("tidings")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def build_parser() -> _Parser:
    """The command line of ``tidings``."""
    fmt = argparse.RawDescriptionHelpFormatter
    conn = _Parser(add_help=False)
    g = conn.add_argument_group("connection")
    shared: list[str] = []  # their option strings (main says they go after the command)

    def option(*names: str, **kwargs: Any) -> None:
        shared.extend(names)
        g.add_argument(*names, **kwargs)

    option(
        "--url",
        default=os.environ.get("TIDINGS_URL", DEFAULT_URL),
        help="broker URL, tidings://HOST:PORT or tidingss:// for TLS (default: $TIDINGS_URL or %(default)s)",
    )
    option("--name", help="client name shown in status (default: tidings-COMMAND)")
    option("--token", default=os.environ.get("TIDINGS_TOKEN"), help="credentials (default: $TIDINGS_TOKEN)")
    option(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="for connecting and for each reply (default: %(default)s)",
    )
    # Their defaults are taken after parsing (take_tls_files), to know where each came from.
    helps = {
        "tls_ca": "tidingss://: trust the CA certificate(s) in this PEM file, not the system's",
        "tls_cert": "tidingss://: present this client certificate, for a broker with --tls-client-ca",
        "tls_key": "the private key of --tls-cert",
    }
    for dest, env in TLS_OPTIONS:
        option("--" + dest.replace("_", "-"), metavar="FILE", help=f"{helps[dest]} (default: ${env})")
    option("-v", "--verbose", action="store_true", help="log what the client library does, on stderr")

    p = _Parser(
        prog="tidings",
        formatter_class=fmt,
        epilog=MAIN_EPILOG,
        description="Talk to a tidings broker: publish, subscribe, fetch, inspect, and speak raw frames.",
    )
    p.command_options = frozenset(shared)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name,
            parents=[conn],
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=epilog + "\n" + EXIT_CODES,
            formatter_class=fmt,
        )
        return parser

    def formats(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--format", "-f", choices=FORMATS, default="json", help="output format (default: json)")

    pub = add("pub", "publish a message, or one per stdin line", PUB_EPILOG)
    pub.add_argument("queue", metavar="QUEUE")
    pub.add_argument("event", metavar="EVENT")
    pub.add_argument("payload", metavar="PAYLOAD", nargs="?", help="JSON (a bare word is a string)")
    pub.add_argument("-H", "--header", action="append", metavar="KEY=VALUE", help="a header (repeatable)")
    pub.add_argument(
        "--id",
        type=_message_id,
        metavar="ID",
        help=f"message id for deduplication, at most {MAX_MESSAGE_ID_LENGTH} characters (stdin lines: ID-LINENO)",
    )
    pub.add_argument("-s", "--string", action="store_true", help="the payload (or each line) is text, not JSON")
    pub.add_argument(
        "--inflight",
        type=_int_at_least(1),
        default=256,
        metavar="N",
        help="stdin mode: publishes awaiting their confirm at once (default: %(default)s)",
    )

    sb = add("sub", "subscribe and print messages as they arrive", SUB_EPILOG)
    sb.add_argument("queue", metavar="QUEUE")
    sb.add_argument(
        "-e",
        "--event",
        action="append",
        metavar="EVENT",
        help=EVENTS_HELP,
    )
    sb.add_argument(
        "-d",
        "--durable",
        metavar="NAME",
        help="a durable cursor that survives disconnects (default: none, a live subscription that keeps nothing)",
    )
    sb.add_argument(
        "--from",
        dest="start",
        type=parse_start,
        default="new",
        metavar="WHERE",
        help="new, earliest, OFFSET or ISO-TIME (default: new)",
    )
    sb.add_argument(
        "-n",
        "--count",
        type=_int_at_least(1),
        metavar="COUNT",
        help="exit after COUNT messages (default: until Ctrl-C)",
    )
    sb.add_argument("--no-ack", action="store_true", help="do not ack (a durable's messages are redelivered)")
    sb.add_argument(
        "--follow",
        action="store_true",
        help="keep going across broker restarts and lost connections, and wait for a broker not up yet at the "
        "start (each retried for up to 60 s)",
    )
    sb.add_argument(
        "--prefetch",
        type=_int_at_least(1, MAX_BATCH),
        default=100,
        metavar="N",
        help="unacked messages in flight at most (default: %(default)s; with -n, at most COUNT)",
    )
    formats(sb)

    fe = add("fetch", "pull a batch of messages once", FETCH_EPILOG)
    fe.add_argument("queue", metavar="QUEUE")
    fe.add_argument("-d", "--durable", metavar="NAME", help="pull from this durable's cursor (and ack)")
    fe.add_argument(
        "-e",
        "--event",
        action="append",
        metavar="EVENT",
        help=EVENTS_HELP,
    )
    fe.add_argument(
        "--max",
        type=_int_at_least(1, MAX_BATCH),
        default=100,
        metavar="N",
        help=f"at most N messages, up to {MAX_BATCH} (default: %(default)s)",
    )
    fe.add_argument(
        "--wait",
        type=_wait_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long when nothing is there (default: 0)",
    )
    fe.add_argument(
        "--from",
        dest="start",
        type=parse_start,
        default=None,
        metavar="WHERE",
        help="plain read or new durable: new, earliest, OFFSET or ISO-TIME (default: earliest)",
    )
    fe.add_argument("--no-ack", action="store_true", help="do not ack a durable's messages")
    formats(fe)

    st = add("status", "show connections, queues and durables", STATUS_EPILOG)
    st.add_argument("--json", action="store_true", help="the STATUS reply as JSON")
    st.add_argument("--watch", type=_seconds, metavar="SECONDS", help="repeat every SECONDS until Ctrl-C")

    qs = add("queues", "list the queues", QUEUES_EPILOG)
    qs.add_argument("--json", action="store_true", help="as a JSON array")

    ds = add("durables", "list the durables, of every queue or of one", DURABLES_EPILOG)
    ds.add_argument("queue", metavar="QUEUE", nargs="?", help="only this queue's durables")
    ds.add_argument("--json", action="store_true", help="as a JSON array")

    pg = add("ping", "round-trip time and server version", PING_EPILOG)
    pg.add_argument(
        "-c",
        "--count",
        type=_int_at_least(0),
        default=1,
        metavar="COUNT",
        help="pings to send, 0 = until Ctrl-C (default: %(default)s)",
    )
    pg.add_argument(
        "-i",
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="between pings (default: %(default)s)",
    )

    dl = add("delete", "delete a durable, or a whole queue", DELETE_EPILOG)
    dl.add_argument("queue", metavar="QUEUE")
    dl.add_argument("--durable", "-d", metavar="NAME", help="delete only this durable")

    sk = add("seek", "rewind a durable or skip it ahead", SEEK_EPILOG)
    sk.add_argument("queue", metavar="QUEUE")
    sk.add_argument("--durable", "-d", metavar="NAME", required=True, help="the durable to move")
    sk.add_argument(
        "--to", required=True, type=parse_start, metavar="POSITION", help="earliest, new, OFFSET or ISO-TIME"
    )

    rw = add("raw", "send frames as JSON lines, print the frames received", RAW_EPILOG)
    rw.add_argument("--hex", action="store_true", help='bytes as {"$hex"} and each frame\'s wire bytes')
    rw.add_argument(
        "--decode",
        nargs="?",
        const="-",
        metavar="FILE",
        help="decode a captured byte stream from FILE (or stdin) instead; no broker needed",
    )
    rw.add_argument("--no-hello", action="store_true", help="skip the handshake (send your own HELLO)")
    rw.add_argument("--echo", action="store_true", help='also print each frame sent, with "sent": true')
    rw.add_argument(
        "--wait",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="after stdin ends, wait this long for missing replies (default: %(default)s)",
    )
    rw.add_argument(
        "--linger",
        type=_positive_float,
        default=0.2,
        metavar="SECONDS",
        help="then keep printing frames this long (default: %(default)s)",
    )
    return p  # fmt: skip


# --- running ------------------------------------------------------------------

#: Connection-level errors that are refusals (exit 3); the other fatal ones end the connection (exit 2).
REFUSALS = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.UNSUPPORTED_VERSION})
#: Commands that run until Ctrl-C (or a count): interrupting them is the normal end, status 0.
STREAMING = frozenset({"sub", "status", "ping", "raw"})
#: Ctrl-C before another command was done (connecting, fetch waiting, pub reading stdin).
EXIT_INTERRUPTED = 130

_CLIENT_COMMANDS: dict[str, Any] = {
    "pub": run_pub,
    "sub": run_sub,
    "fetch": run_fetch,
    "status": run_status,
    "ping": run_ping,
    "delete": run_delete,
    "seek": run_seek,
    "queues": run_queues,
    "durables": run_durables,
}


async def _run(args: argparse.Namespace) -> int:
    stopper = Stopper()
    stopper.install()
    out = Output(1)
    ctx = Context(args, out, stopper)
    if args.command in ("sub", "status", "ping"):
        watch_pipe_close(1, lambda: stopper.stop("stdout closed"))
    try:
        if args.command == "raw":
            return await (run_decode(ctx) if args.decode is not None else run_raw(ctx))
        # A debugging tool reports a lost connection (exit 2) instead of hiding it, but sub --follow.
        follow = args.command == "sub" and args.follow
        context = tls_context(args)

        def make_client() -> Client:
            client = Client(args.url, name=args.name, token=args.token, timeout=args.timeout, reconnect=follow,
                            ssl_context=context)  # fmt: skip
            client._client_cert = client_cert(args)  # (the hint of a refused handshake names --tls-cert)
            return client

        # sub --follow also waits for a broker that is not up yet (within the reconnect deadline).
        client = await connect(make_client, stopper, wait=follow, warn=ctx.warn)
        try:
            code: int = await _CLIENT_COMMANDS[args.command](ctx, client)
        finally:
            await client.aclose()
        return code
    except StoppedWaiting:  # Ctrl-C while sub --follow waited for the broker: it did nothing yet
        return EXIT_INTERRUPTED
    except Stopped:  # Ctrl-C before the command could finish what it was asked
        return EXIT_OK if args.command in STREAMING else EXIT_INTERRUPTED
    finally:
        stopper.uninstall()
        if out.broken:
            silence_stdout()


def _protocol_error(exc: RemoteProtocolError, url: str) -> str:
    """The peer sent bytes that are not tidings frames: most likely not a tidings broker."""
    text = f"{url} does not speak the tidings protocol: {one_line(exc)}"
    if exc.code is ErrorCode.FRAME_TOO_LARGE:
        m = re.search(r"frame of (\d+) bytes", str(exc))
        if m and int(m.group(1)) < 1 << 32:
            prefix = int(m.group(1)).to_bytes(4, "big")
            if prefix.isascii() and prefix.decode().isprintable():
                text += f" (it starts with {prefix.decode()!r}: another protocol?)"
    return text


def _check_options_follow_the_command(parser: _Parser, argv: list[str]) -> None:
    """``tidings --url URL ping`` is a usage error that says what to write
    instead; argparse took the URL for the command ("invalid choice")."""
    first = argv[0].split("=", 1)[0] if argv else ""
    if first in parser.command_options:
        command = next((a for a in argv if a in _CLIENT_COMMANDS or a == "raw"), "COMMAND")
        parser.error(f"{first} goes after the command: tidings {command} {first} ...")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tidings``: returns the exit status."""
    parser = build_parser()
    try:
        _check_options_follow_the_command(parser, sys.argv[1:] if argv is None else argv)
        args, extra = parser.parse_known_args(argv)
        # argparse cannot match an optional positional after options ("pub Q E --string 'a b'").
        if extra and args.command == "pub" and args.payload is None and len(extra) == 1 and extra[0][:1] != "-":
            args.payload, extra = extra[0], []
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except BrokenPipeError:  # --help into a closed pipe
        silence_stdout()
        return EXIT_OK
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL, format="tidings: %(message)s")
    take_tls_files(args, os.environ)
    if args.name is None:
        args.name = f"tidings-{args.command}"
    try:
        if args.command == "pub":
            check_pub(args)
        return asyncio.run(_run(args))
    except UsageError as exc:
        print(f"tidings: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"tidings: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except LocalProtocolError as exc:  # the protocol's checks, the same as the broker's (names, sizes)
        if exc.code is ErrorCode.BAD_REQUEST:  # a value no request may carry: the parser's checks missed one
            print(f"tidings: {one_line(exc)} (not sent)", file=sys.stderr)
            return EXIT_USAGE
        print(f"tidings: refused: {exc.code.name}: {one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except ServerError as exc:  # (after LocalProtocolError: a local InvalidName is a ServerError too)
        if exc.fatal and exc.code not in REFUSALS:  # SHUTTING_DOWN, SLOW_CONSUMER, ...: the connection ended
            print(f"tidings: the broker ended the connection: {one_line(exc)}", file=sys.stderr)
            return EXIT_CONNECT
        print(f"tidings: refused by the broker: {one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:  # the reader of stdout went away: not an error
        silence_stdout()
        return EXIT_OK
    except RemoteProtocolError as exc:
        print(f"tidings: {_protocol_error(exc, args.url)}", file=sys.stderr)
        return EXIT_CONNECT
    except RequestTimeout as exc:
        print(f"tidings: no answer from the broker at {args.url}: {one_line(exc)}", file=sys.stderr)
        return EXIT_CONNECT
    except (ConnectionLost, ConnectionClosed, OSError) as exc:
        print(f"tidings: {connect_error(exc)}", file=sys.stderr)
        return EXIT_CONNECT
    except TidingsError as exc:
        print(f"tidings: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("TIDINGS_DEBUG"):
            raise
        print(f"tidings: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(set TIDINGS_DEBUG=1 for the traceback)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
