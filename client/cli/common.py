"""Exit codes, the usage error, graceful stopping on signals, the TLS options."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
from collections.abc import Awaitable
from typing import Final, TypeVar

__all__ = [
    "EXIT_CONNECT",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "Stopped",
    "Stopper",
    "UsageError",
    "tls_context",
]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 1  # bad arguments or bad input (a payload that is not JSON, ...)
EXIT_CONNECT: Final = 2  # the broker cannot be reached, or the connection broke
EXIT_REFUSED: Final = 3  # the broker (or the protocol's own checks) refused a request

T = TypeVar("T")


class UsageError(Exception):
    """Bad arguments or bad input: exit code 1 with a one-line message."""


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` ask for;
    None for the default (the system's CAs, no client certificate).

    Raises:
        UsageError: a file cannot be read or used.
    """
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    # ssl's errors for a missing file name no file ("[Errno 2] No such file or
    # directory"): open each one first, to say which.
    for option, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"cannot read {option} {path}: {exc.strerror or exc}") from exc
    try:
        ctx = ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use --tls-ca {args.tls_ca}: {exc}") from exc
    if args.tls_cert:
        try:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use --tls-cert {args.tls_cert} with --tls-key {args.tls_key}: {exc}") from exc
    return ctx


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
