"""Exit codes, the usage error, what every command gets (Context), graceful stopping on signals, the TLS options."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from .._address import parse_url
from .streams import Output

__all__ = [
    "EXIT_CONNECT",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "TLS_OPTIONS",
    "Context",
    "Stopped",
    "Stopper",
    "TlsFile",
    "UsageError",
    "client_cert",
    "one_line",
    "take_tls_files",
    "tls_context",
]

logger = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_USAGE: Final = 1  # bad arguments or bad input (a payload that is not JSON, ...)
EXIT_CONNECT: Final = 2  # the broker cannot be reached, or the connection broke
EXIT_REFUSED: Final = 3  # the broker (or the protocol's own checks) refused a request

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class UsageError(Exception):
    """Bad arguments or bad input: exit code 1 with a one-line message."""


@dataclass(frozen=True, slots=True)
class TlsFile:
    """A PEM file of a ``--tls-*`` option, and how it was given.

    Attributes:
        path: the file.
        named: ``--tls-ca`` when given on the command line, ``$TIDINGS_TLS_CA``
            when taken from the environment: errors say which, and only the
            command line's are a mistake with a plain ``tidings://`` URL.
    """

    path: str
    named: str

    @property
    def from_env(self) -> bool:
        return self.named.startswith("$")


#: The TLS options: argparse dest, and the environment variable that is its default.
TLS_OPTIONS: Final = (("tls_ca", "TIDINGS_TLS_CA"), ("tls_cert", "TIDINGS_TLS_CERT"), ("tls_key", "TIDINGS_TLS_KEY"))


def take_tls_files(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Turn ``args.tls_*`` into :class:`TlsFile` (or None), from the command
    line, else from ``environ``, noting which."""
    for dest, variable in TLS_OPTIONS:
        given = getattr(args, dest)
        if given is not None:
            setattr(args, dest, TlsFile(given, "--" + dest.replace("_", "-")))
        else:
            setattr(args, dest, TlsFile(environ[variable], f"${variable}") if environ.get(variable) else None)


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` ask for
    (see :func:`take_tls_files`); None for the default (the system's CAs, no
    client certificate), and for a plain ``tidings://`` URL.

    With a plain URL, files given on the command line are a usage error (the
    URL was most likely meant to be ``tidingss://``: going on would connect
    in plain TCP without a word), and files from the environment are
    ignored (the variables may be set for other brokers).

    Raises:
        UsageError: a file given with a plain URL, or one that cannot be read or used.
        ConfigError: the URL is not a tidings URL.
    """
    given: list[TlsFile] = [f for f in (args.tls_ca, args.tls_cert, args.tls_key) if f is not None]
    host, port, tls = parse_url(args.url)
    if not tls:
        if typed := [f.named for f in given if not f.from_env]:
            raise UsageError(f"{' and '.join(typed)} {'is' if len(typed) == 1 else 'are'} for TLS, "
                             f"but {args.url} is plain TCP: use tidingss://{host}:{port}")  # fmt: skip
        if given:
            logger.debug("%s ignored: %s is plain TCP", " and ".join(f.named for f in given), args.url)
        return None
    if not given:
        return None
    ca, cert, key = args.tls_ca, args.tls_cert, args.tls_key
    if (cert is None) != (key is None):
        missing = (
            "a key (--tls-key, $TIDINGS_TLS_KEY)" if key is None else "a certificate (--tls-cert, $TIDINGS_TLS_CERT)"
        )
        raise UsageError(f"{(cert or key).named} without {missing}: --tls-cert and --tls-key go together")
    # ssl's errors for a missing file name no file ("[Errno 2] No such file or
    # directory"): open each one first, to say which.
    for f in given:
        try:
            with open(f.path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot read {f.named} {f.path}: {exc.strerror or exc}") from exc
    try:
        ctx = ssl.create_default_context(cafile=None if ca is None else ca.path)
    except (OSError, ssl.SSLError) as exc:
        what = "the system's CA certificates" if ca is None else f"{ca.named} {ca.path}"
        raise UsageError(f"cannot use {what}: {exc}") from exc
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(cert.path, key.path)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use {cert.named} {cert.path} with {key.named} {key.path}: {exc}") from exc
    return ctx


def client_cert(args: argparse.Namespace) -> str | bool:
    """What the context of :func:`tls_context` presents as client certificate,
    for the hint when a broker refuses the handshake: the file, and which
    option or variable gave it, or False (none)."""
    cert: TlsFile | None = args.tls_cert
    return False if cert is None else f"{cert.path} ({cert.named})"


@dataclass
class Context:
    """What every command gets: parsed args, stdout, the stop switch."""

    args: argparse.Namespace
    out: Output
    stopper: Stopper

    def warn(self, message: str) -> None:
        """Print one line on stderr, after ``tidings: ``."""
        print(f"tidings: {message}", file=sys.stderr, flush=True)


class Stopped(Exception):
    """Raised by :meth:`Stopper.race` once a stop was requested."""


class Stopper:
    """Turns SIGINT/SIGTERM (and a closed stdout pipe) into a graceful stop.

    The first signal sets :attr:`event`; streaming commands notice it, flush
    their acks and exit 0. A second signal exits at once.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""
        self._waiter: asyncio.Task[bool] | None = None
        self._signals: list[int] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - not the main thread
                continue
            self._signals.append(sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()
        if self._waiter is not None:
            self._waiter.cancel()

    def _on_signal(self, sig: int) -> None:
        if self.event.is_set():
            os._exit(128 + sig)  # second Ctrl-C: no more waiting for the broker
        self.stop(signal.Signals(sig).name)

    def stop(self, reason: str) -> None:
        """Request a graceful stop (callable from the event loop only)."""
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    async def race(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless a stop comes first; then cancel it and raise Stopped."""
        if self.event.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            raise Stopped
        task = asyncio.ensure_future(aw)
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.ensure_future(self.event.wait())
        await asyncio.wait({task, self._waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:  # it failed while being cancelled: the stop wins
            pass
        raise Stopped
