"""``tidings-broker`` (also ``python -m broker``): run the broker in the foreground.

The only place that reads the command line and the environment, configures
logging and picks the event loop (uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import logging
import os
import platform
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from protocol import ConfigError, Limits
from protocol.wording import many

from .check import (
    EXIT_CANNOT_CHECK,
    EXIT_DAMAGED,
    EXIT_OK,
    QueueCheck,
    check_queue,
    locked_for_check,
    segment_size_note,
)
from .config import (
    DEFAULT_DATA_DIR,
    DEFAULT_PORT,
    MIN_MAX_FRAME_BYTES,
    BrokerConfig,
    FsyncPolicy,
    QueueRetention,
    load_queue_config,
)
from .retention import retention_lines, retention_summary
from .server import ALWAYS_LOGGED_KEY, Broker, package_version
from .store import is_trash

#: Descriptors the broker needs besides one per connection: the listening
#: socket, the event loop's own (epoll, self-pipe), stdio, and per queue an open
#: segment and its directory while it syncs or rolls. 1,024 leaves room for
#: a few hundred queues.
FD_HEADROOM = 1024

EPILOG = """\
examples:
  tidings-broker                                  127.0.0.1:6464, data in ./tidings-data
  tidings-broker --port 7000 --data-dir /var/lib/tidings
  tidings-broker --fsync interval --fsync-interval 0.2
  TIDINGS_TOKEN=s3cret tidings-broker --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem

TLS (--tls-cert, --tls-key): the port then speaks only TLS 1.2 or later;
clients use tidingss://host:port and verify the certificate (for a private
CA: `tidings --tls-ca ca.pem ...`, or ssl_context= in Python). A connection
that has not finished its handshake within 2 s is closed. A handshake that
fails is logged at INFO with the peer and why (no client certificate, one
not signed by --tls-client-ca, an expired one, not TLS, a timeout, a client
that refused the broker's certificate); a burst of them from one host is
that line, then one line per 10 s counting the others. SIGHUP re-reads
--tls-cert, --tls-key and --tls-client-ca (a renewed certificate): new
connections get the new files, open ones carry on; files that cannot be used
change nothing (an ERROR says which and why).

durability (--fsync):
  always    confirm a publish only after its bytes are fsynced; concurrent
            publishes share one fsync (group commit). Nothing confirmed is
            ever lost, even on power failure. The default.
  interval  confirm after the write; fsync every --fsync-interval seconds. A
            power failure may lose what was confirmed in the last interval; a
            crash of the broker process alone loses nothing.
  never     confirm after the write; the OS flushes when it likes.

per-queue retention (--config FILE, TOML): a queue's section overrides the
flags for the keys it names, and only those (0 or false switch a rule off):
  [queues.audit]
  retention_age = 0         # no age limit for audit, whatever --retention-age says
  keep_unacked = true       # and never drop what a durable has not acked;
                            # --retention-bytes still applies to it
The retention in force for each queue of the file (each key, and whether the
file or a flag gives it) is logged at start-up, at INFO.

users (--users FILE, TOML; TIDINGS_TOKEN is then ignored): each client's token
names one user, and each request is checked against what that user may do:
  [users.orders]
  token_sha256 = "..."              # printf %s TOKEN | sha256sum (or token = "...");
                                    # a list gives several tokens: ["OLD", "NEW"]
  publish = ["orders", "orders.*"]  # queue names; * matches any run of characters
  subscribe = ["billing"]           # SUBSCRIBE FETCH ACK NACK PROGRESS SEEK
  delete = []                       # DELETE of queues and durables
  status = false                    # STATUS
A refused request gets PERMISSION_DENIED and changes nothing. SIGHUP re-reads
the file: connections of removed users or removed tokens are closed
(AUTH_FAILED), and so are those consuming a queue their user may no longer
read (PERMISSIONS_CHANGED); the rest carry on under the new rights. To
change a token, add the new one beside the old, SIGHUP, move the clients,
remove the old one, SIGHUP: only connections still on the old token are
closed.

signals: SIGINT/SIGTERM stop gracefully (stop accepting, sync, persist
cursors, close clients); a second one exits at once. SIGHUP reloads --users
and the TLS files.
exit codes: 0 clean stop; 1 could not start with the options given (the port
taken, the data directory used by another broker or not writable, a --config,
--users or TLS file that cannot be read or used); 2 usage error: the command
line itself is wrong (a value out of range, options that do not go together),
said under the usage line; 3 storage failure.

--check (tidings-broker --data-dir DIR --check) reads every queue's log and
durable cursors as a start would, changing no file, and prints a line per
queue: ok; a torn tail a start would cut; or the damage that makes a start
refuse it, with what --repair would keep and mark lost; then each durable's
cursor (ok, damaged, past the log's end) and the settings a start restores
for it (event filter, ack wait, delivery limit and dead-letter queue, the
messages it hands out again), saying when they are lost with the cursor file
and the defaults (every event) hold until a consumer subscribes with its
own; and, in parentheses, each file a start removes or ignores (an
interrupted DELETE's or --repair's leftovers, a cursor save a crash cut
short, a damaged recovery point, files tidings does not use). It needs the
broker stopped. Give it the broker's own options (its command line with
--check added): the verdicts are those of a start with the options given,
--segment-bytes bounding what --repair may mark lost; options a start would
refuse (a bad --config file) are a usage error. When a segment file shows
that a broker with a larger --segment-bytes wrote it, a note says so.
exit codes of --check: 0 every queue would be served (torn tails included: a
start cuts them; a damaged cursor too: a start uses an older copy), 1 some
queue is damaged (a start refuses it), 2 usage error, 3 could not check (a
broker holds the data directory, or a directory or file cannot be read).
"""


class _Threshold(logging.Filter):
    """``--log-level``: the lines at ``level`` or above, and those marked
    ``ALWAYS_LOGGED`` (``listening on HOST:PORT``) at any level."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or getattr(record, ALWAYS_LOGGED_KEY, False)


def _at_least(kind: type[float] | type[int], low: float, *, strict: bool = False):  # type: ignore[no-untyped-def]
    """An argparse type: a number of ``kind``, at least ``low`` (above it if ``strict``)."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}: {text!r}")
        return value

    return parse


def _positive(kind: type[float] | type[int]):  # type: ignore[no-untyped-def]
    return _at_least(kind, 0, strict=True)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 = any free port): {text!r}")
    return value


def _frame_bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < MIN_MAX_FRAME_BYTES:
        raise argparse.ArgumentTypeError(
            f"{value} is below the minimum of {MIN_MAX_FRAME_BYTES} (room for a STATUS page and a message)"
        )
    return value


def _token(users: Path | None) -> str | None:
    """The shared token from TIDINGS_TOKEN, unless --users is given: then the
    users file's tokens count, and TIDINGS_TOKEN (likely set for the
    ``tidings`` tool in the same shell) is ignored, with a warning."""
    token = os.environ.get("TIDINGS_TOKEN") or None
    if token is not None and users is not None:
        logging.getLogger("broker").warning("TIDINGS_TOKEN is ignored: --users is given, its tokens count")
        return None
    return token


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tidings-broker``."""
    p = argparse.ArgumentParser(
        prog="tidings-broker",
        description="Run the tidings message-queue broker in the foreground.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="TCP port, 0 = any free port (default: %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where queues and cursors are stored (default: ./%(default)s)",
    )
    p.add_argument(
        "--fsync",
        choices=[f.value for f in FsyncPolicy],
        default="always",
        help="when publishes are confirmed relative to fsync (default: %(default)s; see below)",
    )
    p.add_argument(
        "--fsync-interval",
        type=_positive(float),
        default=1.0,
        metavar="SECONDS",
        help="seconds between fsyncs with --fsync interval (default: %(default)s)",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=_frame_bytes,
        default=Limits().max_frame_size,
        metavar="BYTES",
        help=f"largest frame accepted, at least {MIN_MAX_FRAME_BYTES}; bounds a message to this less 640 bytes "
        "(default: %(default)s). Lowered while messages stored under a larger limit remain, a limit that "
        "covers them is announced so that they go out; new messages are held to this one",
    )
    p.add_argument(
        "--segment-bytes",
        type=_at_least(int, 4096),
        default=BrokerConfig().segment_bytes,
        metavar="BYTES",
        help="roll a queue's log file at this size, at least 4096 (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive(int),
        default=BrokerConfig().max_connections,
        metavar="N",
        help="refuse connections beyond this many (default: %(default)s)",
    )
    p.add_argument(
        "--heartbeat",
        type=_at_least(float, 0),
        default=BrokerConfig().heartbeat,
        metavar="SECONDS",
        help="check each client for silence this often, 0 = off: PING after one silent interval, disconnect "
        "after two in a row (default: %(default)s)",
    )
    p.add_argument(
        "--dedup-window",
        type=_positive(float),
        default=BrokerConfig().dedup_window,
        metavar="SECONDS",
        help="how long a message_id, and a producer's sequence, is remembered: a publish resent within it is "
        "stored once; keep it above the clients' reconnect deadline (60 s by default); a start-up reads "
        "this much of each log back (default: %(default)s)",
    )
    p.add_argument(
        "--retention-bytes",
        type=_at_least(int, 0),
        default=0,
        metavar="BYTES",
        help="per queue, drop the oldest whole segments beyond this size, 0 = keep all (default: %(default)s)",
    )
    p.add_argument(
        "--retention-age",
        type=_at_least(float, 0),
        default=0.0,
        metavar="SECONDS",
        help="per queue, drop whole segments whose newest message is older than this, the one being written "
        "included, 0 = keep all (default: %(default)s)",
    )
    p.add_argument(
        "--retention-check",
        type=_positive(float),
        default=BrokerConfig().retention_check,
        metavar="SECONDS",
        help="how often retention drops segments (default: %(default)s)",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of per-queue retention: a [queues.NAME] section sets retention_bytes, retention_age or "
        "keep_unacked for that queue, and the flags hold for the keys it leaves out (see below)",
    )
    p.add_argument(
        "--keep-unacked",
        action="store_true",
        help="retention never drops a message that some durable has not acked",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="serve a queue whose log is damaged instead of refusing it: rewrite the damaged segment file, keeping "
        "every intact record and putting a 'tidings.lost' message at each offset that cannot be read back (copy the "
        "queue's folder aside first to keep the damaged bytes)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the data directory and exit, changing nothing: each queue's state, what a start would cut or "
        "refuse, and what --repair would do (see below)",
    )
    p.add_argument(
        "--users",
        type=Path,
        metavar="FILE",
        help="TOML file of users: their tokens and the queues each may publish to, subscribe to and delete "
        "(see below; TIDINGS_TOKEN is then ignored; SIGHUP re-reads it)",
    )
    p.add_argument(
        "--auth-failure-delay",
        type=_at_least(float, 0),
        default=BrokerConfig().auth_failure_delay,
        metavar="SECONDS",
        help="with TIDINGS_TOKEN or --users: after 3 wrong tokens from one address within a minute, delay the answer to the "
        "4th and each later one by this, doubling up to 2 s; 0 = at once (default: %(default)s)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM certificate (chain): serve TLS, for tidingss:// URLs (needs --tls-key; SIGHUP re-reads both)",
    )
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA certificate(s): require clients to present a certificate signed by one (mutual TLS); "
        "each one refused is logged at INFO with why",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe lines logged (default: %(default)s); 'listening on HOST:PORT' is logged at every level",
    )
    return p  # fmt: skip


def startup_line(config: BrokerConfig, loop: str) -> str:
    """The broker's first line: its version and runtime, and the settings that
    decide what a confirm means and what is kept.

    Example: ``tidings-broker 0.1.0 (CPython 3.11.7, uvloop 0.23.0): fsync
    always (a publish is confirmed once on disk); segments of 64 MiB;
    retention: everything kept``.
    """
    fsync = {
        FsyncPolicy.ALWAYS: "fsync always (a publish is confirmed once on disk)",
        FsyncPolicy.INTERVAL: f"fsync every {config.fsync_interval:g} s (a publish is confirmed before it)",
        FsyncPolicy.NEVER: "fsync never (a publish is confirmed once written; the OS flushes when it likes)",
    }[config.fsync]
    size = config.segment_bytes
    segments = f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size} bytes"
    retention = retention_summary(config.retention) + (" (some queues their own: --config)" if config.queues else "")
    runtime = f"{platform.python_implementation()} {platform.python_version()}, {loop}"
    return f"tidings-broker {package_version()} ({runtime}): {fsync}; segments of {segments}; retention: {retention}"


def config_from_args(args: argparse.Namespace, queues: Mapping[str, QueueRetention] | None = None) -> BrokerConfig:
    """Build the BrokerConfig from parsed arguments and the environment.

    Args:
        args: the parsed command line.
        queues: the ``--config`` file's sections, already read (None: read
            ``args.config`` here).

    Raises:
        ConfigError: an inconsistent combination of options, or (``queues``
            None) a ``--config`` file that cannot be read or is not valid.
    """
    limits = Limits(max_frame_size=args.max_frame_bytes, handshake_frame_size=min(8192, args.max_frame_bytes))
    return BrokerConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        fsync=FsyncPolicy(args.fsync),
        fsync_interval=args.fsync_interval,
        limits=limits,
        segment_bytes=args.segment_bytes,
        max_connections=args.max_connections,
        heartbeat=args.heartbeat,
        dedup_window=args.dedup_window,
        repair=args.repair,
        retention_bytes=args.retention_bytes,
        retention_age=args.retention_age,
        retention_keep_unacked=args.keep_unacked,
        retention_check=args.retention_check,
        queues=queues if queues is not None else load_queue_config(args.config) if args.config else {},
        token=_token(args.users),
        users_file=args.users,
        auth_failure_delay=args.auth_failure_delay,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE so that ``max_connections`` can be held.

    The soft limit is often 1,024 while the hard one is far higher; servers
    raise it for themselves (nginx ``worker_rlimit_nofile``, Redis at start-up
    for ``maxclients``). It is never lowered, and never raised past the hard
    limit: if that is too low, say so, and accept() will fail with EMFILE
    before ``max_connections`` is reached.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    log = logging.getLogger("broker")
    want = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, new, exc)
            return
        log.debug("descriptor limit raised from %d to %d (hard limit %s)", soft, new, hard)
        soft = new
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "descriptor limit %d (hard) is below --max-connections %d + %d: raise it (ulimit -Hn) "
            "or connections will fail before the limit",
            soft, max_connections, FD_HEADROOM,
        )  # fmt: skip


async def _run(config: BrokerConfig) -> int:
    loop = asyncio.get_running_loop()
    exit_code = 0

    def storage_failed(reason: str) -> None:
        # R7: a failed fsync is fail-stop. Exit without syncing or confirming
        # anything more; the next start recovers from what is on disk.
        logging.getLogger("broker").critical("exiting: %s", reason)
        os._exit(3)

    broker = Broker(config, on_fatal=storage_failed)
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        nonlocal exit_code
        if stopping.is_set():
            logging.getLogger("broker").warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        logging.getLogger("broker").info("%s received: stopping", signal.Signals(signum).name)
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, broker.reload)
    await broker.start()
    # Everything loaded so far (modules, queues' indexes, cursors) lives as
    # long as the process: frozen, the collector never walks it again. A full
    # collection walked these ~23,000 objects in a 5 ms pause, about once per
    # 100,000 publishes here; with them frozen none came in such a run.
    gc.freeze()
    await stopping.wait()
    await broker.aclose()
    return exit_code


class _Lines:
    """``--check``'s output: once stdout is closed (``| head``), the check goes
    on unprinted, so that its exit code still says what it found."""

    def __init__(self) -> None:
        self.open = True

    def print(self, text: str) -> None:
        if self.open:
            try:
                print(text, flush=True)
            except OSError:  # a closed pipe (EPIPE), a full disk: the code still counts
                self.open = False
                with contextlib.suppress(OSError):
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (what the interpreter flushes at exit)


def check_data_dir(config: BrokerConfig) -> int:
    """``--check``: print each queue's state (see :mod:`broker.check`) and a summary.

    Args:
        config: what a start with the same options would run with (its
            ``segment_bytes`` bounds what ``--repair`` may mark lost).

    Returns:
        The exit code: ``EXIT_OK``, ``EXIT_DAMAGED`` or ``EXIT_CANNOT_CHECK``.
    """
    root = config.data_dir.resolve()
    checks: list[QueueCheck] = []
    out = _Lines()
    try:
        with locked_for_check(root):
            queues = root / "queues"
            for path in sorted(queues.iterdir()) if queues.is_dir() else []:
                if is_trash(path):
                    out.print(f"({path.name}: left by an interrupted DELETE; a start removes it)")
                    continue
                if not path.is_dir():
                    out.print(f"({path.name}: not a queue's directory; a start ignores it)")
                    continue
                check = check_queue(path, segment_bytes=config.segment_bytes)
                out.print("\n".join(check.lines()))
                checks.append(check)
    except OSError as exc:
        print(f"tidings-broker: cannot check: {exc}", file=sys.stderr)
        return EXIT_CANNOT_CHECK
    note = segment_size_note(checks, config.segment_bytes)
    if note is not None:
        out.print(note)
    damaged = sum(c.damaged for c in checks)
    unreadable = sum(c.unreadable is not None for c in checks)
    verdict = [f"{damaged} damaged (a start refuses {'it' if damaged == 1 else 'them'})"] if damaged else []
    verdict += [f"{unreadable} could not be read"] if unreadable else []
    out.print(f"{root}: {many(len(checks), 'queue')} checked: {', '.join(verdict) or 'a start would serve every one'}")
    if damaged:
        return EXIT_DAMAGED
    return EXIT_CANNOT_CHECK if unreadable else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tidings-broker``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check and args.repair:
        parser.error("--check changes nothing and already says what --repair would do: drop --repair")
    level = logging.getLevelNamesMapping()[args.log_level.upper()]
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Threshold(level))
    logging.basicConfig(
        level=min(level, logging.INFO),  # (the ALWAYS_LOGGED lines are INFO: _Threshold drops the others)
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        handlers=[handler],
    )
    # Two kinds of refusal (see "exit codes" in --help): a command line that
    # is wrong in itself is a usage error (2), like those argparse finds; a
    # file it names that cannot be used stops the start (1), like the --users
    # and TLS files, read by Broker.start(), and a port already taken.
    try:
        queues = load_queue_config(args.config) if args.config else {}
    except ConfigError as exc:
        if args.check:  # (exit 1 would say "damaged"): the options are wrong, as for a value out of range
            parser.error(f"a start with these options would fail, so --check cannot say what it would do: {exc}")
        print(f"tidings-broker: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        config = config_from_args(args, queues)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if args.check:
        return check_data_dir(config)
    if args.config is not None:
        for line in retention_lines(config, str(args.config)):
            logging.getLogger("broker").info("retention of %s", line)
    if config.token is not None:
        logging.getLogger("broker").info("clients must present the token set in TIDINGS_TOKEN")
    if config.token is None and config.users_file is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("broker").warning(
            "no TIDINGS_TOKEN or --users: any client that can reach %s may connect", config.host
        )
    raise_fd_limit(config.max_connections)
    try:
        import uvloop
    except ImportError:
        runner, loop = asyncio.Runner(), "asyncio"
    else:
        runner, loop = (
            asyncio.Runner(loop_factory=uvloop.new_event_loop),
            f"uvloop {importlib.metadata.version('uvloop')}",
        )
    logging.getLogger("broker").info("%s", startup_line(config, loop))
    try:
        with runner:
            return runner.run(_run(config))
    except (OSError, ConfigError) as exc:
        print(f"tidings-broker: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
